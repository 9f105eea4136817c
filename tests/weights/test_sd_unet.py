"""Stable Diffusion UNet / AnimateDiff checkpoints: parity with diffusers, round trips, errors.

The references are diffusers' PyTorch ``UNet2DConditionModel`` and
``UNetMotionModel`` (with a ``MotionAdapter``) at a tiny size with random
weights. Both sides run in float32; they differ only by summation order
(convolutions, matmuls, GroupNorm reductions), measured ~1e-6 on outputs of
size ~1, so the tolerance is 1e-5 of the output scale; a wrong transpose,
skip order or norm placement gives errors of order 0.1-1.
"""

import re

import jax
import numpy as np
import pytest

from vf3d_jax.models import unet
from vf3d_jax.weights import sd_unet
from vf3d_jax.weights.rules import flat, unflat
from vf3d_jax.weights.state_dict import CheckpointError, write_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

jax.config.update("jax_default_matmul_precision", "highest")

# Not visible in shapes: the tiny arch's head counts and GroupNorm groups.
HIDDEN = dict(attention_heads=2, norm_num_groups=8, motion_heads=2)
TINY = unet.UNetArch.tiny()
MOTION = unet.UNetArch.tiny(motion_modules=True)
VIDEO = unet.UNetArch.tiny(motion_modules=True, temporal_conv=True, condition_channels=5)
FRAMES = 3


def _numpy_state(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A tiny diffusers UNet and motion adapter with random weights, saved as safetensors."""
  torch.manual_seed(0)
  image = diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 48, 64),
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      layers_per_block=2, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8).eval()
  adapter = diffusers.MotionAdapter(
      block_out_channels=(32, 48, 64), motion_layers_per_block=2, motion_num_attention_heads=2,
      motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=True)
  with torch.no_grad():
    # Non-trivial norm scales and biases everywhere; the adapter's every
    # weight random too (its proj_out would otherwise hide the temporal path).
    for _, p in image.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
    for name, p in adapter.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
      else:
        p.copy_(float("norm" in name and name.endswith("weight")) + 0.1 * torch.randn_like(p))
  video = diffusers.UNetMotionModel.from_unet2d(image, adapter).eval()
  folder = tmp_path_factory.mktemp("sd_unet")
  image_state, motion_state = _numpy_state(image), _numpy_state(adapter)
  write_safetensors(image_state, folder / "unet.safetensors")
  write_safetensors(motion_state, folder / "motion_adapter.safetensors")
  write_safetensors(_original_layout(motion_state), folder / "mm_original.safetensors")
  return dict(image=image, video=video, image_state=image_state, motion_state=motion_state,
              folder=folder)


def _original_layout(state):
  """A MotionAdapter state dict renamed to the original AnimateDiff layout, with its buffers."""
  out = {}
  for key, value in state.items():
    if key.endswith(".pos_embed.pe"):
      continue
    key = re.sub(r"(\.motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
    for new, old in ((".attention_blocks.0.", ".attn1."), (".attention_blocks.1.", ".attn2."),
                     (".norms.0.", ".norm1."), (".norms.1.", ".norm2."), (".ff_norm.", ".norm3.")):
      key = key.replace(old, new)
    out[key] = value
    if key.endswith("attention_blocks.0.to_q.weight"):
      for k in (0, 1):
        buffer = key.replace("attention_blocks.0.to_q.weight",
                             f"attention_blocks.{k}.pos_encoder.pe")
        out[buffer] = np.zeros((1, 32, value.shape[0]), np.float32)
  assert any(".temporal_transformer.transformer_blocks.0.ff_norm." in k for k in out)
  return out


def _inputs(batch, frames, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, frames, 16, 16, 4)).astype(np.float32)
  ctx = rng.standard_normal((batch, 7, 32)).astype(np.float32)
  return x, np.array([17, 640])[:batch], ctx


def _assert_close(out, ref):
  out, ref = np.asarray(out), np.asarray(ref)
  scale = max(1.0, np.abs(ref).max())
  err = np.abs(out - ref).max()
  print(f"parity: max abs error {err:.3g}, output scale {scale:.3g}")
  assert err < 1e-5 * scale, f"max abs error {err} (output scale {scale})"


def _same(a, b):
  fa, fb = flat(a), flat(b)
  return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
                                        for k in fa)


def test_image_unet_matches_diffusers_per_frame(reference):
  arch, params = sd_unet.load_unet(reference["folder"] / "unet.safetensors", **HIDDEN)
  assert arch == TINY
  x, ts, ctx = _inputs(batch=2, frames=2)
  out = jax.jit(unet.UNet(arch).apply)({"params": params}, x, ts, ctx)
  with torch.no_grad():
    ref = reference["image"](torch.from_numpy(x.reshape(4, 16, 16, 4).transpose(0, 3, 1, 2)),
                             torch.from_numpy(np.repeat(ts, 2)),
                             torch.from_numpy(np.repeat(ctx, 2, axis=0))).sample.numpy()
  _assert_close(out, ref.transpose(0, 2, 3, 1).reshape(x.shape))


@pytest.fixture(scope="module")
def motion_reference(reference):
  x, ts, ctx = _inputs(batch=2, frames=FRAMES, seed=1)
  with torch.no_grad():
    ref = reference["video"](torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), torch.from_numpy(ts),
                             torch.from_numpy(np.repeat(ctx, FRAMES, axis=0))).sample.numpy()
  ref = ref.transpose(0, 2, 3, 4, 1)
  # The temporal path is exercised: the image model per frame is far from it.
  with torch.no_grad():
    per_frame = reference["image"](
        torch.from_numpy(x.reshape(-1, 16, 16, 4).transpose(0, 3, 1, 2)),
        torch.from_numpy(np.repeat(ts, FRAMES)),
        torch.from_numpy(np.repeat(ctx, FRAMES, axis=0))).sample.numpy()
  assert np.abs(per_frame.transpose(0, 2, 3, 1).reshape(ref.shape) - ref).max() > 0.1
  return (x, ts, ctx), ref, jax.jit(unet.UNet(MOTION).apply)


@pytest.mark.parametrize("motion_file", ["motion_adapter.safetensors", "mm_original.safetensors"])
def test_motion_unet_matches_diffusers(reference, motion_reference, motion_file):
  (x, ts, ctx), ref, apply = motion_reference
  arch, params = sd_unet.load_unet(reference["folder"] / "unet.safetensors",
                                   motion_path=reference["folder"] / motion_file,
                                   adapters="require", **HIDDEN)
  assert arch == MOTION
  _assert_close(apply({"params": params}, x, ts, ctx), ref)


def test_both_motion_layouts_give_the_same_parameters(reference):
  a = sd_unet.motion_params_from_state_dict(reference["motion_state"], MOTION)
  b = sd_unet.motion_params_from_state_dict(_original_layout(reference["motion_state"]), MOTION)
  assert _same(a, b)


def test_written_keys_are_diffusers_keys(reference):
  image = sd_unet.image_params_from_state_dict(reference["image_state"], TINY)
  written = sd_unet.unet_to_state_dict(image)
  assert {k: v.shape for k, v in written.items()} == {
      k: v.shape for k, v in reference["image_state"].items()}
  motion = sd_unet.motion_params_from_state_dict(reference["motion_state"], MOTION)
  written = sd_unet.motion_to_state_dict(motion)
  assert {k: v.shape for k, v in written.items()} == {
      k: v.shape for k, v in reference["motion_state"].items() if not k.endswith(".pe")}
  assert all(np.array_equal(v, reference["motion_state"][k]) for k, v in written.items())


def _random_params(arch, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                      unet.param_shapes(arch))


def test_round_trips_are_exact(reference):
  image = sd_unet.image_params_from_state_dict(reference["image_state"], TINY)
  assert _same(sd_unet.image_params_from_state_dict(sd_unet.unet_to_state_dict(image), TINY), image)

  params = _random_params(VIDEO, 0)
  state = sd_unet.unet_to_state_dict(params)
  assert "down_blocks.0.resnets.1.temporal_conv2.conv.weight" in state
  assert state["conv_in_cond.weight"].shape == (32, 5, 3, 3)
  assert sd_unet.infer_unet_arch(state, **HIDDEN) == VIDEO
  assert _same(sd_unet.unet_from_state_dict(state, VIDEO, adapters="require"), params)
  motion = sd_unet.motion_params_from_state_dict(sd_unet.motion_to_state_dict(params), VIDEO)
  assert _same(motion, unflat({p: x for p, x in flat(params).items() if "motion_modules" in p}))


def test_missing_unexpected_and_wrong_shape_keys_are_named(reference):
  state = dict(reference["image_state"])
  key = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"
  with pytest.raises(CheckpointError, match=r"missing: " + re.escape(key)):
    sd_unet.image_params_from_state_dict({k: v for k, v in state.items() if k != key}, TINY)
  with pytest.raises(CheckpointError, match=r"unexpected: down_blocks\.0\.extra\.weight"):
    sd_unet.image_params_from_state_dict({**state, "down_blocks.0.extra.weight": state[key]}, TINY)
  bad = "down_blocks.1.resnets.0.conv1.weight"
  with pytest.raises(CheckpointError, match=r"wrong shape: " + re.escape(bad)):
    sd_unet.image_params_from_state_dict({**state, bad: state[bad][:, :-1]}, TINY)
  # A 1x1-conv checkpoint cannot load into linear projections.
  with pytest.raises(CheckpointError, match=r"wrong shape: .*proj_in\.weight"):
    sd_unet.image_params_from_state_dict(state, unet.UNetArch.tiny(use_linear_projection=True))


def test_adapter_errors(reference):
  image_state, motion_state = reference["image_state"], reference["motion_state"]
  with pytest.raises(CheckpointError, match=r"missing: .*motion_modules"):
    sd_unet.unet_from_state_dict(image_state, MOTION, adapters="require")
  with pytest.raises(CheckpointError, match=r"unexpected: .*motion_modules"):
    sd_unet.unet_from_state_dict(image_state, TINY, motion_state=motion_state)
  # A motion checkpoint with a tensor missing is not silently completed.
  key = "up_blocks.2.motion_modules.1.transformer_blocks.0.attn2.to_v.weight"
  with pytest.raises(CheckpointError, match=r"missing: " + re.escape(key)):
    sd_unet.unet_from_state_dict(image_state, MOTION,
                                 motion_state={k: v for k, v in motion_state.items() if k != key})
  both = {**image_state, key: motion_state[key]}
  with pytest.raises(CheckpointError, match="given twice"):
    sd_unet.unet_from_state_dict(both, MOTION, motion_state=motion_state)
  image = sd_unet.image_params_from_state_dict(image_state, TINY)
  with pytest.raises(CheckpointError, match=r"given twice: conv_in/bias"):
    sd_unet.merge_params(unet.param_shapes(TINY), image, {"conv_in": image["conv_in"]})
  with pytest.raises(CheckpointError, match=r"original Stable Diffusion"):
    sd_unet.infer_unet_arch({"model.diffusion_model.input_blocks.0.0.weight": np.zeros(1)})


def test_fresh_adapters_start_at_identity(reference):
  arch = unet.UNetArch.tiny(temporal_conv=True, condition_channels=5)
  params = sd_unet.unet_from_state_dict(reference["image_state"], arch)
  image = sd_unet.image_params_from_state_dict(reference["image_state"], TINY)
  leaves = flat(params)
  assert _same(unflat({p: v for p, v in leaves.items() if not unet.is_adapter(p)}), image)
  adapters = {p: np.asarray(v) for p, v in leaves.items() if unet.is_adapter(p)}
  assert len(adapters) == 17 * 2 * 4 + 1
  for path, value in adapters.items():
    expected = 1.0 if path.endswith("norm/scale") else 0.0
    assert np.all(value == expected), path


def test_motion_module_matches_diffusers_on_small_inputs():
  """One temporal transformer on inputs of std 1e-3, where the GroupNorm epsilon matters."""
  transformer_3d = diffusers.models.unets.unet_motion_model.AnimateDiffTransformer3D
  torch.manual_seed(1)
  frames, channels = 5, 32
  module = transformer_3d(
      num_attention_heads=2, attention_head_dim=channels // 2, in_channels=channels,
      norm_num_groups=8, attention_bias=False, activation_fn="geglu",
      positional_embeddings="sinusoidal", num_positional_embeddings=32,
      double_self_attention=True).eval()
  with torch.no_grad():
    for _, p in module.named_parameters():
      p.add_(0.2 * torch.randn_like(p))
  state = {f"mid_block.motion_modules.0.{k}": v for k, v in _numpy_state(module).items()}
  ours = unet.MotionModule(frames=frames, heads=2, groups=8)
  x = 1e-3 * np.random.default_rng(2).standard_normal((2 * frames, 4, 4, channels)).astype(
      np.float32)
  shapes = jax.eval_shape(ours.init, jax.random.key(0), x)["params"]
  params = sd_unet.params_from_state_dict(
      state, sd_unet.TABLE, {"mid_block": {"motion_modules_0": shapes}},
      ignore=sd_unet.POSITION_BUFFERS)["mid_block"]["motion_modules_0"]
  out = ours.apply({"params": params}, x) - x
  with torch.no_grad():
    ref = module(torch.from_numpy(x.transpose(0, 3, 1, 2)), num_frames=frames).numpy()
  _assert_close(out, ref.transpose(0, 2, 3, 1) - x)
