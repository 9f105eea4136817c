"""The Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL, and the frame helpers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.models import vae
from vf3d_jax.weights import sd_vae

jax.config.update("jax_default_matmul_precision", "highest")

# Three levels (two downsamplers, 8 -> 16 widening shortcut, 16 -> 16 plain
# skip), two resnets per level: every code path of the SD 1.5 layout, small.
ARCH = vae.VAEArch(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4)


def _torch_vae(arch: vae.VAEArch, seed: int = 0):
  """A diffusers AutoencoderKL of ``arch`` with every tensor random (norms and biases too)."""
  torch = pytest.importorskip("torch")
  autoencoder_kl = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl")
  levels = len(arch.block_out_channels)
  model = autoencoder_kl.AutoencoderKL(
      in_channels=arch.in_channels, out_channels=arch.out_channels,
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels,
      block_out_channels=arch.block_out_channels, layers_per_block=arch.layers_per_block,
      latent_channels=arch.latent_channels, norm_num_groups=arch.norm_num_groups,
      scaling_factor=arch.scaling_factor).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("norm1.weight", "norm2.weight", "group_norm.weight", "norm_out.weight")):
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
  return model


def _random_params(arch: vae.VAEArch, seed: int = 0):
  """Random parameters from numpy (jitting ``init`` would cost seconds of compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.prod(s.shape[:-1]) ** 0.5
                                 ).astype(np.float32), vae.param_shapes(arch))


@pytest.fixture(scope="module")
def reference():
  torch = pytest.importorskip("torch")
  model = _torch_vae(ARCH)
  params = sd_vae.vae_from_state_dict(
      {k: v.numpy() for k, v in model.state_dict().items()}, ARCH)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)  # non-square: H, W not swapped
  latents = rng.normal(size=(2, 4, 3, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    decoded = model.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
  to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return dict(params=params, images=images, latents=latents, mean=to_nhwc(posterior.mean),
              logvar=to_nhwc(posterior.logvar), decoded=to_nhwc(decoded))


# float32 on both sides with full-precision matmuls; the remaining difference is
# summation order in convolutions and GroupNorm over ~30 layers (measured <= 8e-7).
TOL = 1e-5


def test_encode_matches_diffusers(reference):
  model = vae.AutoencoderKL(ARCH)
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
      reference["params"], reference["images"])
  assert mean.shape == (2, 4, 6, 4) and mean.dtype == jnp.float32
  np.testing.assert_allclose(mean, reference["mean"], atol=TOL, rtol=0)
  np.testing.assert_allclose(logvar, reference["logvar"], atol=TOL, rtol=0)
  assert float(np.abs(reference["mean"]).max()) > 0.1  # not a vacuous comparison


def test_decode_matches_diffusers(reference):
  model = vae.AutoencoderKL(ARCH)
  out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(
      reference["params"], reference["latents"])
  assert out.shape == (2, 16, 12, 3)
  np.testing.assert_allclose(out, reference["decoded"], atol=TOL, rtol=0)
  assert float(np.abs(reference["decoded"]).max()) > 0.1


def test_logvar_is_clipped_like_diffusers():
  # A huge quant_conv bias on the logvar half must be clipped at 20.
  model = vae.AutoencoderKL(vae.VAEArch.tiny())
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), vae.param_shapes(model.arch))
  params["quant_conv"]["bias"][4:] = 100.0
  _, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
      params, jnp.zeros((1, 4, 4, 3)))
  np.testing.assert_array_equal(logvar, 20.0)


def test_frame_helpers_fold_chunk_and_scale():
  arch = dataclasses.replace(vae.VAEArch.tiny(), shift_factor=0.25)
  model = vae.AutoencoderKL(arch)
  params = _random_params(arch)
  frames = jax.random.uniform(jax.random.key(1), (2, 3, 8, 8, 3), minval=-1, maxval=1)
  key = jax.random.key(2)

  @jax.jit  # one compilation for everything (6 frames, chunks of 4: a padded chunk)
  def run(p, frames, key):
    mean, logvar = model.apply({"params": p}, frames.reshape(6, 8, 8, 3), method=model.encode)
    latents = vae.encode_frames(model, p, frames, chunk_size=4)
    return dict(
        mean=mean, logvar=logvar, latents=latents,
        sampled=vae.encode_frames(model, p, frames, key, chunk_size=4),
        sampled_by_one=vae.encode_frames(model, p, frames, key, chunk_size=1),
        decoded=vae.decode_frames(model, p, latents, chunk_size=4),
        direct=model.apply({"params": p}, mean, method=model.decode))

  r = jax.tree.map(np.asarray, run(params, frames, key))
  scale = lambda z: ((z - 0.25) * arch.scaling_factor).reshape(2, 3, 4, 4, 4)
  assert r["latents"].shape == (2, 3, 4, 4, 4)
  np.testing.assert_allclose(r["latents"], scale(r["mean"]), atol=1e-6)
  draw = r["mean"] + np.exp(0.5 * r["logvar"]) * np.asarray(jax.random.normal(key, (6, 4, 4, 4)))
  np.testing.assert_allclose(r["sampled"], scale(draw), atol=1e-6)
  np.testing.assert_allclose(r["sampled_by_one"], r["sampled"], atol=1e-6)  # chunking-free draw
  assert r["decoded"].shape == frames.shape
  np.testing.assert_allclose(r["decoded"].reshape(6, 8, 8, 3), r["direct"], atol=1e-5)


def test_arch_validation_and_dict_round_trip():
  arch = vae.VAEArch.tiny()
  assert vae.VAEArch.from_dict(arch.to_dict()) == arch
  assert vae.VAEArch.from_dict({"block_out_channels": [16, 32], "norm_num_groups": 8}
                               ).block_out_channels == (16, 32)
  assert vae.VAEArch.sd15().downsample_factor == 8
  assert vae.count_params(vae.param_shapes(arch)) < 200_000
  with pytest.raises(ValueError, match="multiples of norm_num_groups"):
    vae.VAEArch(block_out_channels=(12, 32), norm_num_groups=8)
  with pytest.raises(ValueError, match="at least one"):
    vae.VAEArch(block_out_channels=())
  with pytest.raises(ValueError, match="multiples of 2"):
    vae.AutoencoderKL(arch).init(jax.random.key(0), jnp.zeros((1, 5, 4, 3)))
