"""The LRM against a PyTorch reference built from torch.nn primitives."""

import dataclasses
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.models import lrm, triplane
from vf3d_jax.models.dinov2 import EncoderArch
from vf3d_jax.rendering import cameras
from vf3d_jax.weights import vfusion3d

torch = pytest.importorskip("torch")
from tests import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

SMALL = lrm.LRMArch(
    encoder=EncoderArch(width=48, depth=2, heads=3, mlp_dim=96, patch_size=4, pos_grid=9),
    camera_embed_dim=40, width=64, layers=2, heads=4, mlp_dim=128, triplane_res=4,
    triplane_channels=6, decoder_hidden=16, input_size=34)


def _reference(arch, seed=0, legacy=True):
  ref = torch_reference.TorchLRM(arch, legacy=legacy).eval()
  torch_reference.randomize_(ref, seed=seed)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  return ref, jax.tree.map(jnp.asarray, vfusion3d.from_state_dict(state, arch))


def _inputs(arch, n=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(n, arch.input_size, arch.input_size, 3)).astype(np.float32)
  cams = np.stack([cameras.DEFAULT_SOURCE_CAMERA] * n) + 0.1 * rng.standard_normal((n, 16))
  return images, cams.astype(np.float32)


def _torch(x):
  return torch.from_numpy(np.asarray(x))


def test_reference_state_dict_has_released_key_names():
  ref = torch_reference.TorchLRM(lrm.LRMArch(
      encoder=EncoderArch(width=24, heads=1, mlp_dim=8), camera_embed_dim=8, width=16, heads=1,
      mlp_dim=8, triplane_res=2, triplane_channels=4, decoder_hidden=8))
  released = {line.split("\t")[0] for line in open(_spec_tsv()).read().strip().splitlines()}
  assert set(ref.state_dict()) == released  # all 592 keys


def _spec_tsv():
  """The released checkpoint's key table, kept with the weight tests."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "weights",
                      "vfusion3d_state_dict.tsv")


@pytest.mark.parametrize("legacy", [True, False])
def test_planes_match_pytorch(legacy):
  arch = dataclasses.replace(SMALL, encoder=dataclasses.replace(
      SMALL.encoder, pos_resize="legacy" if legacy else "current"))
  ref, params = _reference(arch, seed=1, legacy=legacy)
  images, cams = _inputs(arch)
  planes = lrm.LRM(arch).apply({"params": params}, jnp.asarray(images), jnp.asarray(cams))
  with torch.no_grad():
    expected = ref(_torch(images).permute(0, 3, 1, 2), _torch(cams)).numpy()
  ours = np.asarray(planes).transpose(0, 1, 4, 2, 3)  # -> [N, 3, C, H, W]
  assert ours.shape == expected.shape == (2, 3, 6, 8, 8)
  rel = np.abs(ours - expected).max() / np.abs(expected).max()
  assert rel < 1e-5, rel


def test_transformer_block_matches_pytorch():
  ref = torch_reference.Block(64, 4, 48, 40, 128, 1e-6).eval()
  torch_reference.randomize_(ref, seed=2)
  state = {f"transformer.layers.0.{k}": v.numpy() for k, v in ref.state_dict().items()}
  block = lrm.TransformerBlock(SMALL)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 10, 64)).astype(np.float32)
  ctx = rng.standard_normal((2, 7, 48)).astype(np.float32)
  cond = rng.standard_normal((2, 40)).astype(np.float32)
  params = _convert(block, "transformer/layers_0", state, x, ctx, cond)
  ours = block.apply({"params": params}, x, ctx, cond)
  with torch.no_grad():
    expected = ref(_torch(x), _torch(ctx), _torch(cond)).numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_upsampler_matches_conv_transpose():
  deconv = torch.nn.ConvTranspose2d(12, 5, kernel_size=2, stride=2)
  torch_reference.randomize_(deconv, seed=4)
  x = np.random.default_rng(0).standard_normal((3, 4, 6, 12)).astype(np.float32)  # [N, H, W, C]
  up = lrm.Upsampler(5)
  params = _convert(up, "transformer/deconv",
                    {f"transformer.deconv.{k}": v.numpy() for k, v in deconv.state_dict().items()}, x)
  ours = np.asarray(up.apply({"params": params}, x))
  with torch.no_grad():
    expected = deconv(_torch(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert ours.shape == (3, 8, 12, 5)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def _convert(module, prefix, state, *inputs):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]
  flat = {}
  for path in flax.traverse_util.flatten_dict(shapes):
    key, transform = vfusion3d.checkpoint_key(prefix + "/" + "/".join(path))
    flat[path] = jnp.asarray(transform.load(state[key]))
  return flax.traverse_util.unflatten_dict(flat)


def test_grid_sample_matches_pytorch_at_borders():
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  image = rng.standard_normal((5, 7, 4)).astype(np.float32)  # [H, W, C], non-square
  edge = [-1.2, -1.0, -1 + 1 / 7, -0.9999, -0.5, 0.0, 0.31, 0.9999, 1.0, 1.0 + 1 / 7, 1.2, 3.0]
  u, v = np.meshgrid(edge, edge + [0.77], indexing="ij")
  coords = np.stack([u.ravel(), v.ravel()], -1).astype(np.float32)
  coords = np.concatenate([coords, rng.uniform(-1.1, 1.1, (200, 2)).astype(np.float32)])
  ours = np.asarray(triplane.grid_sample(jnp.asarray(image), jnp.asarray(coords)))
  expected = F.grid_sample(_torch(image).permute(2, 0, 1)[None], _torch(coords)[None, None],
                           mode="bilinear", padding_mode="zeros", align_corners=False)
  expected = expected[0, :, 0].T.numpy()
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
  # A corner point reads a quarter of the corner pixel (three zero neighbours).
  corner = triplane.grid_sample(jnp.asarray(image), jnp.asarray([[-1.0, -1.0]]))
  np.testing.assert_allclose(np.asarray(corner)[0], image[0, 0] / 4, rtol=1e-6)


@pytest.mark.parametrize("gather", ["per_plane", "one"])
def test_triplane_sampling_matches_pytorch(gather):
  F = torch.nn.functional
  rng = np.random.default_rng(2)
  planes = rng.standard_normal((3, 5, 7, 4)).astype(np.float32)  # [3, H, W, C], non-square
  points = rng.uniform(-1.2, 1.2, (500, 3)).astype(np.float32)
  points[:12] = np.array([[-1, -1, -1], [1, 1, 1], [1, -1, 0.3], [-0.9999, 0.9999, 1.0]] * 3)
  ours = np.asarray(triplane.sample_triplane(jnp.asarray(planes), jnp.asarray(points),
                                             gather=gather))
  coords = np.stack([points[:, [0, 1]], points[:, [0, 2]], points[:, [2, 1]]])  # [3, M, 2]
  expected = F.grid_sample(_torch(planes).permute(0, 3, 1, 2), _torch(coords)[:, None],
                           mode="bilinear", padding_mode="zeros", align_corners=False)
  expected = expected[:, :, 0].permute(2, 0, 1).reshape(len(points), -1).numpy()
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="gather"):
    triplane.sample_triplane(jnp.asarray(planes), jnp.asarray(points), gather="two")


def test_field_query_matches_pytorch():
  ref, params = _reference(SMALL, seed=5)
  rng = np.random.default_rng(1)
  planes = rng.standard_normal((1, 3, 8, 8, 6)).astype(np.float32)
  points = rng.uniform(-1.05, 1.05, (1, 300, 3)).astype(np.float32)
  density, rgb = triplane.density_rgb(params, jnp.asarray(planes), jnp.asarray(points))
  with torch.no_grad():
    raw, ref_rgb = torch_reference.query_field(
        ref.synthesizer.decoder, _torch(planes[0]).permute(0, 3, 1, 2), _torch(points[0]))
  np.testing.assert_allclose(np.asarray(density)[0],
                             torch.nn.functional.softplus(raw - 1).numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(rgb)[0], ref_rgb.numpy(), rtol=1e-5, atol=1e-6)


def test_bfloat16_planes_close_to_float32():
  arch = SMALL
  _, params = _reference(arch, seed=6)
  images, cams = _inputs(arch, n=1)
  f32 = lrm.LRM(arch).apply({"params": params}, images, cams)
  bf16 = lrm.LRM(arch, dtype=jnp.bfloat16).apply({"params": params}, images, cams)
  assert bf16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  assert rel < 2e-2, rel


def test_lrm_rejects_bad_camera_shape():
  images, _ = _inputs(SMALL, n=1)
  with pytest.raises(ValueError, match="cameras must be"):
    lrm.LRM(SMALL).init(jax.random.key(0), images, jnp.zeros((1, 12)))
