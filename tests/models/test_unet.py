"""The video UNet: parameter counts, adapter selection, identity at init, temporal conv numerics.

Parity with diffusers' PyTorch UNets is in tests/weights/test_sd_unet.py.
"""

import functools
import json

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.models import unet

jax.config.update("jax_default_matmul_precision", "highest")

VIDEO = unet.UNetArch.tiny(temporal_conv=True, motion_modules=True, condition_channels=5)


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _inputs(seed, batch=2, frames=3, size=16, arch=VIDEO):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, frames, size, size, arch.in_channels)).astype(np.float32)
  ctx = rng.standard_normal((batch, 5, arch.cross_attention_dim)).astype(np.float32)
  cond = rng.standard_normal((batch, frames, size, size, max(arch.condition_channels, 1)))
  return x, rng.integers(0, 1000, batch), ctx, cond.astype(np.float32)


def test_sd15_parameter_count():
  # The Stable Diffusion 1.5 UNet (diffusers UNet2DConditionModel) has 859,520,964.
  assert unet.count_params(unet.param_shapes(unet.UNetArch.sd15())) == 859_520_964


def test_motion_module_parameter_count():
  image = unet.count_params(unet.param_shapes(unet.UNetArch.sd15()))
  video = unet.count_params(unet.param_shapes(unet.UNetArch.sd15(motion_modules=True)))
  # AnimateDiff v2 motion modules: diffusers' MotionAdapter() default config,
  # sum(p.numel() for p in MotionAdapter().parameters()) with diffusers 0.36.0.
  assert video - image == 453_209_280
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  with torch.device("meta"):  # shapes only: no memory, no random init cost
    adapter = diffusers.MotionAdapter()
  assert sum(p.numel() for p in adapter.parameters()) == 453_209_280


def test_tiny_is_small():
  n = unet.count_params(unet.param_shapes(unet.UNetArch.tiny()))
  assert 1_000_000 < n < 3_000_000


def test_adapter_mask_selects_exactly_the_adapters():
  shapes = _flat(unet.param_shapes(VIDEO))
  mask = _flat(unet.adapter_mask(unet.param_shapes(VIDEO)))
  assert mask.keys() == shapes.keys()

  def by_components(path):
    parts = path.split("/")
    return any(p.startswith(("temporal_conv", "motion_modules")) or p == "conv_in_cond"
               for p in parts)

  assert {p for p, m in mask.items() if m} == {p for p in shapes if by_components(p)}
  # The rest is exactly the image model, shape for shape.
  image = _flat(unet.param_shapes(unet.UNetArch.tiny()))
  assert {p: s.shape for p, s in shapes.items() if not mask[p]} == {
      p: s.shape for p, s in image.items()}
  # 17 resnets (3 levels x 2 down, 2 mid, 3 x 3 up) x 2 temporal convs x 4
  # leaves; 16 motion modules (6 down, 1 mid, 9 up); one conditioning kernel.
  adapters = [p for p, m in mask.items() if m]
  assert sum("temporal_conv" in p for p in adapters) == 17 * 2 * 4
  modules = {"/".join(p.split("/")[:2]) for p in adapters if "motion_modules" in p}
  assert len(modules) == 16, modules
  assert [p for p in adapters if "conv_in_cond" in p] == ["conv_in_cond/kernel"]
  assert shapes["conv_in_cond/kernel"].shape == (3, 3, 5, 32)


def test_arch_dict_round_trip_and_validation():
  d = json.loads(json.dumps(VIDEO.to_dict()))
  assert unet.UNetArch.from_dict(d) == VIDEO
  with pytest.raises(ValueError, match="attention_levels"):
    unet.UNetArch(attention_levels=(True, False))
  with pytest.raises(ValueError, match="norm_num_groups"):
    unet.UNetArch.tiny(block_out_channels=(32, 44, 64))
  with pytest.raises(ValueError, match="attention_heads"):
    unet.UNetArch.tiny(attention_heads=3)
  with pytest.raises(ValueError, match="motion_heads"):
    unet.UNetArch.tiny(motion_modules=True, motion_heads=5)


def random_params(arch, seed):
  """Random parameters from the shapes alone (a full init compiles slowly on CPU).

  Kernels ~ N(0, 1/fan_in); norm scales 1 + N(0, 0.1^2); biases N(0, 0.1^2),
  so that no scale/bias mapping mistake can hide behind ones and zeros.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, spec):
    shape = spec.shape
    if path[-1] == "kernel":
      return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    return (float(path[-1] == "scale") + 0.1 * rng.standard_normal(shape)).astype(np.float32)

  return flax.traverse_util.path_aware_map(leaf, unet.param_shapes(arch))


@functools.lru_cache(maxsize=None)
def jitted_apply(arch, dtype=jnp.float32, remat=False):
  """One compiled function per model variant, shared by the tests."""
  return jax.jit(unet.UNet(arch, dtype=dtype, remat=remat).apply)


def _video_with_fresh_adapters(image_params):
  # unsafe_rbg: same initialisers, a PRNG that XLA:CPU compiles quickly.
  adapters = unet.init_adapter_params(VIDEO, jax.random.key(7, impl="unsafe_rbg"))
  merged = {**_flat(image_params), **_flat(adapters)}
  assert merged.keys() == _flat(unet.param_shapes(VIDEO)).keys()
  return flax.traverse_util.unflatten_dict(merged, sep="/")


def test_fresh_adapters_are_identity_per_frame():
  image_params = random_params(unet.UNetArch.tiny(), 0)
  video_params = _video_with_fresh_adapters(image_params)
  x, ts, ctx, cond = _inputs(1)
  b, f = x.shape[:2]
  video = jitted_apply(VIDEO, remat=True)({"params": video_params}, x, ts, ctx, cond)
  # The image model on each frame separately (frames as batch, one frame each).
  image = jitted_apply(unet.UNetArch.tiny())(
      {"params": image_params}, x.reshape(b * f, 1, *x.shape[2:]), np.repeat(ts, f),
      np.repeat(ctx, f, axis=0))
  image = np.asarray(image).reshape(x.shape[:4] + (4,))
  assert np.abs(image).max() > 0.3
  np.testing.assert_allclose(np.asarray(video), image, rtol=0, atol=1e-6)


def test_trained_adapters_mix_frames():
  """With non-zero adapters, changing the last frame changes the first frame's output."""
  params = random_params(VIDEO, 2)
  apply = jitted_apply(VIDEO, remat=True)
  x, ts, ctx, cond = _inputs(4)
  out = np.asarray(apply({"params": params}, x, ts, ctx, cond))
  x2 = x.copy()
  x2[:, -1] += 1.0
  out2 = np.asarray(apply({"params": params}, x2, ts, ctx, cond))
  assert np.abs(out2[:, 0] - out[:, 0]).max() > 1e-3
  # The condition matters too.
  out3 = np.asarray(apply({"params": params}, x, ts, ctx, cond * 0))
  assert np.abs(out3 - out).max() > 1e-3


def _group_norm_ref(x, groups, eps, scale, bias):
  """x: [B, F, H, W, C]; statistics per sample and channel group over (F, H, W)."""
  b, f, h, w, c = x.shape
  g = x.reshape(b, f, h, w, groups, c // groups).astype(np.float64)
  mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
  var = g.var(axis=(1, 2, 3, 5), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_temporal_conv_matches_numpy_reference():
  b, f, h, w, c, groups = 2, 4, 3, 5, 16, 4
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, f, h, w, c)).astype(np.float32)
  module = unet.TemporalConv(frames=f, groups=groups, eps=1e-5)
  params = module.init(jax.random.key(0), x.reshape(b * f, h, w, c))["params"]
  np.testing.assert_array_equal(
      module.apply({"params": params}, x.reshape(b * f, h, w, c)), x.reshape(b * f, h, w, c))
  params = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
  out = np.asarray(module.apply({"params": params}, x.reshape(b * f, h, w, c)))

  y = _group_norm_ref(x, groups, 1e-5, params["norm"]["scale"], params["norm"]["bias"])
  y = y / (1 + np.exp(-y))
  kernel, bias = np.asarray(params["conv"]["kernel"]), np.asarray(params["conv"]["bias"])
  padded = np.pad(y, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  conv = sum(np.einsum("bfhwi,io->bfhwo", padded[:, k:k + f], kernel[k]) for k in range(3)) + bias
  np.testing.assert_allclose(out.reshape(x.shape), x + conv, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_stays_close():
  arch = unet.UNetArch.tiny()
  params = random_params(arch, 5)
  x, ts, ctx, _ = _inputs(6, batch=6, frames=1, arch=arch)
  ts = np.arange(6) * 150
  ref = np.asarray(jitted_apply(arch)({"params": params}, x, ts, ctx))
  out = jitted_apply(arch, jnp.bfloat16)({"params": params}, x, ts, ctx)
  assert out.dtype == jnp.float32
  err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
  assert err < 0.05, err


def test_input_validation():
  arch = unet.UNetArch.tiny()
  params = unet.param_shapes(arch)
  model = unet.UNet(arch)
  x, ts, ctx, cond = _inputs(0, frames=1, arch=arch)
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(lambda: model.apply({"params": params}, x[:, :, :14, :14], ts, ctx))
  with pytest.raises(ValueError, match="channels"):
    jax.eval_shape(lambda: model.apply({"params": params}, x[..., :3], ts, ctx))
  with pytest.raises(ValueError, match="without condition_channels"):
    jax.eval_shape(lambda: model.apply({"params": params}, x, ts, ctx, cond))
