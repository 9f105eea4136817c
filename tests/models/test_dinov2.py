"""DINOv2 encoder: position-table resize and parity with transformers' PyTorch model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.models import dinov2
from vf3d_jax.ops import resize


def _numpy_bicubic_1d(values, out_size, src_of):
  """Independent loop implementation: Keys cubic (A=-0.75), clamped taps."""
  a = -0.75

  def kernel(x):
    x = abs(x)
    if x <= 1:
      return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
      return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0

  n = values.shape[0]
  out = np.zeros((out_size,) + values.shape[1:], np.float64)
  for d in range(out_size):
    src = src_of(d)
    base = math.floor(src)
    for k in range(base - 1, base + 3):
      out[d] += kernel(src - k) * values[min(max(k, 0), n - 1)]
  return out


def _numpy_resize(table, out, src_of):
  rows = _numpy_bicubic_1d(table, out, src_of)
  return np.stack([_numpy_bicubic_1d(r, out, src_of) for r in rows])


@pytest.mark.parametrize("mode,src_of", [
    ("legacy", lambda d: (d + 0.5) * (37 / 36.1) - 0.5),
    ("current", lambda d: (d + 0.5) * (37 / 36) - 0.5),
])
def test_position_table_resize_matches_numpy_bicubic(mode, src_of):
  rng = np.random.default_rng(0)
  table = rng.standard_normal((1, 1 + 37 * 37, 3)).astype(np.float32)
  out = np.asarray(dinov2.resize_position_table(jnp.asarray(table), (36, 36), mode))
  assert out.shape == (1, 1 + 36 * 36, 3)
  np.testing.assert_array_equal(out[:, 0], table[:, 0])
  expected = _numpy_resize(table[0, 1:].reshape(37, 37, 3).astype(np.float64), 36, src_of)
  np.testing.assert_allclose(out[0, 1:].reshape(36, 36, 3), expected, atol=2e-6)


def test_legacy_and_current_resize_differ():
  # The two variants must not silently coincide: on unit-variance tables they
  # differ by O(0.1-1), which is what makes the switch matter.
  table = jax.random.normal(jax.random.key(0), (1, 1 + 37 * 37, 8))
  legacy = dinov2.resize_position_table(table, (36, 36), "legacy")
  current = dinov2.resize_position_table(table, (36, 36), "current")
  assert 0.2 < float(jnp.abs(legacy - current).max()) < 2.0


def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  x = np.random.default_rng(1).standard_normal((2, 37, 37, 5)).astype(np.float32)
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  to_nhwc = lambda y: y.permute(0, 2, 3, 1).numpy()
  s = 36.1 / 37
  cases = [
      (F.interpolate(t, scale_factor=(s, s), mode="bicubic", align_corners=False),
       resize.resize_bicubic(x, (36, 36), False, scale=(s, s))),
      (F.interpolate(t, size=(36, 36), mode="bicubic", align_corners=False),
       resize.resize_bicubic(x, (36, 36), False)),
      (F.interpolate(t, size=(90, 61), mode="bicubic", align_corners=True),
       resize.resize_bicubic(x, (90, 61), True)),
      (F.interpolate(t, size=(13, 20), mode="bicubic", align_corners=True),
       resize.resize_bicubic(x, (13, 20), True)),
  ]
  for ref, ours in cases:
    # PyTorch accumulates 16 taps in float32 (~1e-5 on unit data); ours is
    # within 4e-7 of the float64 result.
    np.testing.assert_allclose(np.asarray(ours), to_nhwc(ref), atol=3e-5)


@pytest.mark.parametrize("legacy", [True, False])
def test_encoder_matches_transformers_dinov2(legacy):
  torch = pytest.importorskip("torch")
  from tests import torch_reference
  from vf3d_jax.weights import vfusion3d

  arch = dinov2.EncoderArch(width=48, depth=2, heads=3, mlp_dim=96, patch_size=4, pos_grid=6,
                            pos_resize="legacy" if legacy else "current")
  ref = torch_reference.DinoWrapper(48, 2, 3, 96, 4, 6, legacy=legacy).eval()
  torch_reference.randomize_(ref, seed=3)
  # Reuse the LRM conversion table through the full key names.
  state = {f"encoder.{k}": v.numpy() for k, v in ref.state_dict().items()}
  params = {}
  for path in _flat_paths(dinov2.Dinov2Encoder(arch), (1, 30, 30, 3)):
    key, transform = vfusion3d.checkpoint_key("encoder/" + path)
    params[path] = transform.load(state[key])
  params = _unflatten(params)

  images = np.random.default_rng(0).uniform(size=(2, 30, 30, 3)).astype(np.float32)  # 7x7 grid
  ours = dinov2.Dinov2Encoder(arch).apply({"params": params}, jnp.asarray(images))
  with torch.no_grad():
    expected = ref(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  assert ours.shape == expected.shape == (2, 1 + 49, 48)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=2e-5)


def _flat_paths(module, shape):
  import flax.traverse_util
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape)))["params"]
  return ["/".join(k) for k in flax.traverse_util.flatten_dict(shapes)]


def _unflatten(flat):
  import flax.traverse_util
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                           for k, v in flat.items()})


def test_encoder_rejects_bad_images():
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    dinov2.Dinov2Encoder(dinov2.EncoderArch(width=8, depth=1, heads=1, mlp_dim=8)).init(
        jax.random.key(0), jnp.zeros((1, 3, 28, 28)))
