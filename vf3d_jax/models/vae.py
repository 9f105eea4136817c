"""The Stable Diffusion 1.5 variational autoencoder (AutoencoderKL), in Flax.

``mean, logvar = vae.apply({"params": p}, images, method=AutoencoderKL.encode)``
``images = vae.apply({"params": p}, z, method=AutoencoderKL.decode)``

* ``images``: ``[N, H, W, C]`` in [-1, 1] (``H``, ``W`` multiples of
  :attr:`VAEArch.downsample_factor`, 8 for SD 1.5);
* ``mean, logvar``: ``[N, H/8, W/8, latent_channels]`` float32, ``logvar``
  clipped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution`` does;
* the diffusion model works on ``latents = scaling_factor * (z - shift)``
  (:func:`encode_frames`, :func:`decode_frames` handle that and video frames).

Submodule names mirror diffusers' ``AutoencoderKL`` (``encoder/down_blocks_0/
resnets_0/conv1``, ``decoder/mid_block/attentions_0/to_q``, ...), so weight
conversion is a table (``vf3d_jax.weights.sd_vae``). The numerics follow
diffusers: GroupNorm eps 1e-6 everywhere, the encoder downsampler pads
bottom/right by one pixel before its stride-2 3x3 convolution, the decoder
upsamples by nearest-neighbour repetition, the mid-block attention is a single
head over all pixels with a residual connection.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vf3d_jax.models import layers

# diffusers' ResnetBlock2D, GroupNorms and mid attention all use this epsilon in the VAE.
_EPS = 1e-6
# DiagonalGaussianDistribution clips the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEArch:
  """Shape of an AutoencoderKL (defaults: SD 1.5's VAE, 83,653,863 parameters)."""

  in_channels: int = 3  # image channels the encoder reads
  out_channels: int = 3  # image channels the decoder writes
  latent_channels: int = 4  # channels of the latent z
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width of each resolution level
  layers_per_block: int = 2  # resnets per encoder level (the decoder has one more)
  norm_num_groups: int = 32  # GroupNorm groups
  scaling_factor: float = 0.18215  # latents = scaling_factor * (z - shift_factor)
  shift_factor: float | None = None  # None: no shift (SD 1.5)

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if not self.block_out_channels:
      raise ValueError("block_out_channels must name at least one level")
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                 "norm_num_groups"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {self.block_out_channels} must be positive multiples "
                       f"of norm_num_groups={self.norm_num_groups}")
    if not self.scaling_factor > 0:
      raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

  @classmethod
  def sd15(cls) -> "VAEArch":
    """Stable Diffusion 1.5's VAE."""
    return cls()

  @classmethod
  def tiny(cls) -> "VAEArch":
    """A two-level VAE for tests and small experiments (downsample x2, ~160k parameters)."""
    return cls(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEArch":
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["block_out_channels"] = list(self.block_out_channels)
    return d

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side."""
    return 2 ** (len(self.block_out_channels) - 1)


def _conv(features: int, kernel: int, dtype, name: str, *, stride: int = 1,
          padding: Any = "SAME") -> nn.Conv:
  # PyTorch Conv2d's default init: U(+-1/sqrt(fan_in)), fan_in = in * kh * kw.
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, kernel_init=layers.torch_linear_init,
                 name=name)


def _group_norm(groups: int, dtype, name: str) -> nn.GroupNorm:
  # Two-pass variance with float32 statistics, as PyTorch's GroupNorm.
  return nn.GroupNorm(num_groups=groups, epsilon=_EPS, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected when widening) skip."""

  features: int  # output channels
  groups: int  # GroupNorm groups
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[N, H, W, C_in]`` -> ``[N, H, W, features]``."""
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
    h = _conv(self.features, 3, self.dtype, "conv1")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.features, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class Downsample(nn.Module):
  """Zero-pad one pixel at the bottom and right, then a stride-2 3x3 conv (no other padding)."""

  features: int  # output channels
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[N, H, W, C]`` -> ``[N, H/2, W/2, features]`` (``H``, ``W`` even)."""
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.features, 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  features: int  # output channels
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[N, H, W, C]`` -> ``[N, 2H, 2W, features]``."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.features, 3, self.dtype, "conv")(x)


class MidAttention(nn.Module):
  """Single-head self-attention over all pixels, pre-GroupNorm, residual."""

  groups: int  # GroupNorm groups
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[N, H, W, C]`` -> ``[N, H, W, C]``."""
    n, h, w, c = x.shape
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,
                                  kernel_init=layers.torch_linear_init, name=name)
    t = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(n, h * w, c)
    # One head of width C: scale 1/sqrt(C), softmax in float32 (diffusers upcasts it too).
    out = layers.attention(dense("to_q")(t), dense("to_k")(t), dense("to_v")(t), 1,
                           self.attention_impl)
    return x + dense("to_out_0")(out).reshape(n, h, w, c)


class MidBlock(nn.Module):
  """resnet -> attention -> resnet at the lowest resolution."""

  features: int  # channels
  groups: int  # GroupNorm groups
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ResnetBlock(self.features, self.groups, self.dtype, name="resnets_0")(x)
    x = MidAttention(self.groups, self.dtype, self.attention_impl, name="attentions_0")(x)
    return ResnetBlock(self.features, self.groups, self.dtype, name="resnets_1")(x)


class DownBlock(nn.Module):
  """``layers`` resnets, then an optional downsampler."""

  features: int  # output channels
  layers: int  # resnets
  groups: int  # GroupNorm groups
  downsample: bool  # halve the resolution at the end
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.downsample:
      x = Downsample(self.features, self.dtype, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  """``layers`` resnets, then an optional upsampler."""

  features: int  # output channels
  layers: int  # resnets
  groups: int  # GroupNorm groups
  upsample: bool  # double the resolution at the end
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.upsample:
      x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image -> ``2 * latent_channels`` moments (before ``quant_conv``)."""

  arch: VAEArch  # model shape
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[N, H, W, in_channels]`` -> ``[N, H/f, W/f, 2 * latent_channels]``."""
    a, g = self.arch, self.arch.norm_num_groups
    chans = a.block_out_channels
    x = _conv(chans[0], 3, self.dtype, "conv_in")(x)
    for i, ch in enumerate(chans):
      x = DownBlock(ch, a.layers_per_block, g, i < len(chans) - 1, self.dtype,
                    name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], g, self.dtype, self.attention_impl, name="mid_block")(x)
    x = nn.silu(_group_norm(g, self.dtype, "conv_norm_out")(x))
    return _conv(2 * a.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  """Latent (after ``post_quant_conv``) -> image."""

  arch: VAEArch  # model shape
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """``[N, h, w, latent_channels]`` -> ``[N, h*f, w*f, out_channels]``."""
    a, g = self.arch, self.arch.norm_num_groups
    chans = tuple(reversed(a.block_out_channels))
    x = _conv(chans[0], 3, self.dtype, "conv_in")(z)
    x = MidBlock(chans[0], g, self.dtype, self.attention_impl, name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = UpBlock(ch, a.layers_per_block + 1, g, i < len(chans) - 1, self.dtype,
                  name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(g, self.dtype, "conv_norm_out")(x))
    return _conv(a.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """SD-style KL autoencoder; ``__call__`` reconstructs (from the mean unless ``rng`` is given)."""

  arch: VAEArch = VAEArch()  # model shape
  dtype: jnp.dtype = jnp.float32  # compute dtype (parameters are always float32)
  attention_impl: str | None = None  # see layers.attention

  def setup(self):
    a = self.arch
    self.encoder = Encoder(a, self.dtype, self.attention_impl)
    self.decoder = Decoder(a, self.dtype, self.attention_impl)
    self.quant_conv = _conv(2 * a.latent_channels, 1, self.dtype, "quant_conv")
    self.post_quant_conv = _conv(a.latent_channels, 1, self.dtype, "post_quant_conv")

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[N, H, W, in_channels]`` in [-1, 1] -> ``(mean, logvar)``, each ``[N, H/f, W/f, latent]``."""
    f = self.arch.downsample_factor
    if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"images must be [N, H, W, C] with H, W multiples of {f}, "
                       f"got {images.shape}")
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled ``z`` ``[N, h, w, latent]`` -> ``[N, h*f, w*f, out_channels]``, about [-1, 1]."""
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    mean, logvar = self.encode(images)
    return self.decode(mean if rng is None else sample_latent(rng, mean, logvar))


def init_params(arch: VAEArch, rng: jax.Array, image_size: int | None = None):
  """Random parameters (float32); the image size does not change their shapes."""
  size = image_size or 2 * arch.downsample_factor
  images = jnp.zeros((1, size, size, arch.in_channels), jnp.float32)
  return AutoencoderKL(arch).init(rng, images)["params"]


def param_shapes(arch: VAEArch):
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
  return jax.eval_shape(lambda rng: init_params(arch, rng), jax.random.key(0))


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def sample_latent(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """A draw ``mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)``; shaped like ``mean``."""
  eps = jax.random.normal(key, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * eps


def to_diffusion_latents(arch: VAEArch, z: jax.Array) -> jax.Array:
  """VAE latent ``z`` -> the diffusion model's latents, ``scaling_factor * (z - shift)``."""
  shift = arch.shift_factor or 0.0
  return (z - shift) * arch.scaling_factor


def from_diffusion_latents(arch: VAEArch, latents: jax.Array) -> jax.Array:
  """Inverse of :func:`to_diffusion_latents`."""
  shift = arch.shift_factor or 0.0
  return latents / arch.scaling_factor + shift


def _map_chunks(fn, x: jax.Array, chunk_size: int):
  """``fn`` over ``x``'s leading axis ``chunk_size`` items at a time (sequentially, in a loop).

  Pads the leading axis to a multiple of ``chunk_size`` and drops the padding
  again, so peak activation memory is that of one chunk.
  """
  n = x.shape[0]
  chunks = -(-n // chunk_size)
  padded = jnp.pad(x, [(0, chunks * chunk_size - n)] + [(0, 0)] * (x.ndim - 1))
  out = jax.lax.map(fn, padded.reshape((chunks, chunk_size) + x.shape[1:]))
  return jax.tree.map(lambda y: y.reshape((chunks * chunk_size,) + y.shape[2:])[:n], out)


def encode_frames(vae: AutoencoderKL, params, frames: jax.Array, rng: jax.Array | None = None, *,
                  chunk_size: int = 4) -> jax.Array:
  """Video frames -> diffusion latents.

  Args:
    vae: the module (its ``arch`` gives the scaling).
    params: its parameters.
    frames: ``[B, F, H, W, in_channels]`` in [-1, 1].
    rng: draws ``z`` from the posterior when given, else ``z`` is its mean.
    chunk_size: frames encoded at once (bounds activation memory).

  Returns:
    ``[B, F, H/f, W/f, latent_channels]`` float32, ``scaling_factor * (z - shift)``.
    The noise is drawn for all frames at once, so it does not depend on
    ``chunk_size``.
  """
  b, f = frames.shape[:2]
  encode = lambda x: vae.apply({"params": params}, x, method=AutoencoderKL.encode)
  mean, logvar = _map_chunks(encode, frames.reshape((b * f,) + frames.shape[2:]), chunk_size)
  z = mean if rng is None else sample_latent(rng, mean, logvar)
  return to_diffusion_latents(vae.arch, z).reshape((b, f) + z.shape[1:])


def decode_frames(vae: AutoencoderKL, params, latents: jax.Array, *,
                  chunk_size: int = 4) -> jax.Array:
  """Diffusion latents ``[B, F, h, w, latent]`` -> frames ``[B, F, h*f, w*f, out_channels]``.

  Frames are float32, about [-1, 1] (not clipped); ``chunk_size`` frames are
  decoded at once.
  """
  b, f = latents.shape[:2]
  z = from_diffusion_latents(vae.arch, latents.reshape((b * f,) + latents.shape[2:]))
  decode = lambda x: vae.apply({"params": params}, x, method=AutoencoderKL.decode)
  images = _map_chunks(decode, z, chunk_size)
  return images.reshape((b, f) + images.shape[1:])
