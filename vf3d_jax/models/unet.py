"""A Stable-Diffusion-layout UNet over video frames, with temporal adapters.

``eps = UNet(arch).apply({"params": params}, sample, timesteps, context, condition)``

* ``sample``: ``[B, F, H, W, in_channels]`` noisy latents of ``F`` frames
  (``F = 1`` for images); ``H`` and ``W`` divisible by ``2 ** (levels - 1)``;
* ``timesteps``: ``[B]`` diffusion steps (int or float);
* ``context``: ``[B, L, cross_attention_dim]`` text (or image) tokens, shared
  by every frame of a sample;
* ``condition``: ``[B, F, H, W, condition_channels]`` or ``None`` (zeros);
* output: ``[B, F, H, W, out_channels]`` float32.

The image model is diffusers' ``UNet2DConditionModel`` (the Stable Diffusion
1.5 layout: cross-attention down/up blocks, a cross-attention mid block). Its
layers see frames folded into the batch (``[B * F, H, W, C]``), so with every
video option off this is that UNet applied to each frame independently.

Video adapters (all parameters under :data:`ADAPTER_PATTERN`, each an identity
at initialisation so a fresh video model reproduces the image model per frame):

* ``temporal_conv``: EMU-Video-style residual 1D convolutions over frames,
  ``x + Conv1d_k3(silu(GroupNorm(x)))`` with a zero-initialised convolution,
  inside every resnet after ``conv1`` and after ``conv2``;
* ``motion_modules``: AnimateDiff temporal transformers (attention over the
  frame axis at each pixel, sinusoidal frame positions), placed where
  diffusers' ``UNetMotionModel`` places them, ``proj_out`` zero-initialised;
* ``condition_channels``: first-frame conditioning. Concatenating the
  conditioning channels (first-frame latent, frame mask) to the noisy input
  and widening ``conv_in`` with zero-initialised input channels is the same
  function as adding a separate zero-initialised, bias-free 3x3 convolution of
  the conditioning channels (``conv_in_cond``) to ``conv_in``'s output, because
  a convolution is linear in its input channels: ``conv([x, c]; [W_x, W_c]) =
  conv(x; W_x) + conv(c; W_c)``. Keeping them apart lets ``conv_in`` load from
  Stable Diffusion unchanged and stay frozen.

Submodule names mirror diffusers (``down_blocks_0/resnets_1/conv1``,
``up_blocks_2/attentions_0/transformer_blocks_0/attn2/to_q``, ...), so
checkpoint conversion is a table (``vf3d_jax.weights.sd_unet``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax.models import layers

Dtype = Any

# Parameters of the video adapters: everything else is the image model.
ADAPTER_PATTERN = r".*(temporal_conv|motion_modules|conv_in_cond).*"

# Conv2d/Conv1d kernels initialised like PyTorch's default (kaiming_uniform,
# a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_init = layers.torch_linear_init
_zeros = nn.initializers.zeros
# Epsilon of the GroupNorm in front of every transformer (diffusers hard-codes it).
_TRANSFORMER_NORM_EPS = 1e-6
# Epsilon of the LayerNorms inside transformer blocks.
_LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class UNetArch:
  """Shape of a UNet (defaults: Stable Diffusion 1.5, 859,520,964 parameters)."""

  in_channels: int = 4  # latent channels in
  out_channels: int = 4  # channels predicted
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each resolution level
  # Whether each level has cross-attention (up blocks mirror it).
  attention_levels: tuple[bool, ...] = (True, True, True, False)
  layers_per_block: int = 2  # resnets per down block (up blocks have one more)
  attention_heads: int = 8  # heads of the spatial attention (diffusers' SD1.5 "attention_head_dim")
  cross_attention_dim: int = 768  # width of the context tokens
  norm_num_groups: int = 32  # GroupNorm groups everywhere
  norm_eps: float = 1e-5  # GroupNorm epsilon of resnets and the output norm
  use_linear_projection: bool = False  # transformer proj_in/out: Dense (SD2) or 1x1 conv (SD1.5)
  flip_sin_to_cos: bool = True  # timestep embedding order: [cos, sin] if True else [sin, cos]
  freq_shift: int = 0  # timestep embedding frequency shift (diffusers' downscale_freq_shift)
  temporal_conv: bool = False  # residual temporal 1D convs after each resnet's conv1 and conv2
  motion_modules: bool = False  # AnimateDiff temporal transformers after each block layer
  motion_mid_block: bool = True  # also one in the mid block (AnimateDiff v2 layout)
  motion_heads: int = 8  # heads of the temporal attention
  motion_max_frames: int = 32  # frames the motion modules accept (sinusoid table length)
  condition_channels: int = 0  # first-frame conditioning channels (latent + mask), 0 = none

  def __post_init__(self):
    # Accept lists (JSON) and store tuples, so the dataclass stays hashable.
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
    channels = self.block_out_channels
    if not channels:
      raise ValueError("block_out_channels is empty")
    if len(self.attention_levels) != len(channels):
      raise ValueError(f"attention_levels has {len(self.attention_levels)} entries for "
                       f"{len(channels)} block_out_channels")
    if min(channels) <= 0 or self.in_channels <= 0 or self.out_channels <= 0:
      raise ValueError(f"channel counts must be positive: {channels}, in {self.in_channels}, "
                       f"out {self.out_channels}")
    if self.layers_per_block < 1:
      raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
    for c in channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block width {c} is not divisible by "
                         f"norm_num_groups={self.norm_num_groups}")
    # The mid block always has cross-attention, at the last level's width.
    for c, attention in zip(channels + (channels[-1],), self.attention_levels + (True,)):
      if attention and c % self.attention_heads:
        raise ValueError(f"block width {c} is not divisible by "
                         f"attention_heads={self.attention_heads}")
    if self.motion_modules:
      for c in channels:
        if c % self.motion_heads:
          raise ValueError(f"block width {c} is not divisible by motion_heads={self.motion_heads}")
        if c % 2:
          raise ValueError(f"motion modules need even block widths (sinusoid table), got {c}")
      if self.motion_max_frames < 1:
        raise ValueError(f"motion_max_frames must be >= 1, got {self.motion_max_frames}")
    if self.condition_channels < 0:
      raise ValueError(f"condition_channels must be >= 0, got {self.condition_channels}")

  @classmethod
  def sd15(cls, **video_options) -> "UNetArch":
    """Stable Diffusion 1.5, with the given video options (``motion_modules=True``, ...)."""
    return cls(**video_options)

  @classmethod
  def tiny(cls, **overrides) -> "UNetArch":
    """A small UNet of the same layout (three levels, ~1.5M parameters) for tests."""
    fields = dict(block_out_channels=(32, 48, 64), attention_levels=(True, True, False),
                  attention_heads=2, cross_attention_dim=32, norm_num_groups=8, motion_heads=2)
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UNetArch":
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  @property
  def levels(self) -> int:
    return len(self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def downscale(self) -> int:
    """Spatial size divisor of the input (one halving between levels)."""
    return 2 ** (self.levels - 1)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep features (diffusers' ``get_timestep_embedding``).

  Args:
    timesteps: ``[N]`` (may be fractional).
    dim: feature count; odd counts get a trailing zero.
    flip_sin_to_cos: order ``[cos, sin]`` instead of ``[sin, cos]``.
    freq_shift: frequencies are ``max_period ** (-i / (dim // 2 - freq_shift))``.

  Returns:
    ``[N, dim]`` float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def frame_positions(frames: int, dim: int) -> np.ndarray:
  """Sinusoidal frame position table (diffusers' ``SinusoidalPositionalEmbedding``).

  ``pe[t, 2i] = sin(t * w_i)``, ``pe[t, 2i + 1] = cos(t * w_i)``,
  ``w_i = 10000 ** (-2i / dim)``; computed in float32 as PyTorch does.

  Returns:
    ``[frames, dim]`` float32.
  """
  position = np.arange(frames, dtype=np.float32)[:, None]
  freq = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  pe = np.zeros((frames, dim), np.float32)
  pe[:, 0::2] = np.sin(position * freq)
  pe[:, 1::2] = np.cos(position * freq)
  return pe


def _group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype,
                name: str) -> nn.GroupNorm:
  # Statistics over every axis but the first, per channel group; two-pass
  # variance in float32 (PyTorch's numerics).
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      use_fast_variance=False, name=name)


class _Module(nn.Module):
  """Shared dtype fields."""

  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  def dense(self, features: int, name: str, use_bias: bool = True, kernel_init=_torch_init):
    return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=kernel_init, name=name)

  def conv(self, features: int, name: str, kernel: int = 3, stride: int = 1, use_bias: bool = True,
           kernel_init=_torch_init):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=kernel_init, name=name)


class Attention(_Module):
  """diffusers ``Attention``: bias-free q/k/v, biased output, scale ``head_dim ** -0.5``."""

  heads: int = 1  # attention heads
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """``x: [N, T, D]``, ``context: [N, S, D_ctx]`` (``None``: self-attention) -> ``[N, T, D]``."""
    width = x.shape[-1]
    context = x if context is None else context
    q = self.dense(width, "to_q", use_bias=False)(x)
    k = self.dense(width, "to_k", use_bias=False)(context)
    v = self.dense(width, "to_v", use_bias=False)(context)
    out = layers.attention(q, k, v, self.heads, self.attention_impl)
    return self.dense(width, "to_out_0")(out)


class GEGLU(_Module):
  """``Dense(x) -> [h, g]``, ``h * gelu(g)`` (exact gelu)."""

  features: int = 0  # output width

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, gate = jnp.split(self.dense(2 * self.features, "proj")(x), 2, axis=-1)
    return h * layers.gelu(gate)


class TransformerBlock(_Module):
  """diffusers ``BasicTransformerBlock``: attn1, attn2, GEGLU feed-forward, pre-LayerNorm.

  Spatial blocks cross-attend to the context in ``attn2``; temporal (motion)
  blocks use ``attn2`` as a second self-attention and add sinusoidal
  positions to the normalised input of both attentions.
  """

  heads: int = 1  # attention heads
  cross_attention: bool = True  # attn2 attends to the context (else to itself)
  positions: bool = False  # add frame positions before attn1 and attn2
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """``x: [N, T, D]`` -> ``[N, T, D]``."""
    width = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype,
                                     param_dtype=self.param_dtype, use_fast_variance=False,
                                     name=name)
    attention = lambda name: Attention(self.dtype, self.param_dtype, self.heads,
                                       self.attention_impl, name=name)
    pe = jnp.asarray(frame_positions(x.shape[1], width)) if self.positions else 0.0
    x = x + attention("attn1")(norm("norm1")(x) + pe)
    x = x + attention("attn2")(norm("norm2")(x) + pe, context if self.cross_attention else None)
    return x + FeedForward(self.dtype, self.param_dtype, name="ff")(norm("norm3")(x))


class FeedForward(_Module):
  """GEGLU to 4x width, Dense back (diffusers ``FeedForward``: ``net.0.proj``, ``net.2``)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = GEGLU(self.dtype, self.param_dtype, 4 * width, name="net_0")(x)
    return self.dense(width, "net_2")(h)


class SpatialTransformer(_Module):
  """diffusers ``Transformer2DModel``: GroupNorm, proj_in, block over pixels, proj_out, residual."""

  heads: int = 1  # attention heads
  groups: int = 32  # GroupNorm groups
  linear_projection: bool = False  # proj_in/out are Dense (else 1x1 convs)
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """``x: [N, H, W, C]``, ``context: [N, L, D]`` -> ``[N, H, W, C]``."""
    n, h, w, c = x.shape
    proj = ((lambda name: self.dense(c, name)) if self.linear_projection
            else (lambda name: self.conv(c, name, kernel=1)))
    y = _group_norm(self.groups, _TRANSFORMER_NORM_EPS, self.dtype, self.param_dtype, "norm")(x)
    y = proj("proj_in")(y).reshape(n, h * w, c)
    block = TransformerBlock(self.dtype, self.param_dtype, self.heads, cross_attention=True,
                             attention_impl=self.attention_impl, name="transformer_blocks_0")
    y = block(y, context)
    return proj("proj_out")(y.reshape(n, h, w, c)) + x


def _to_frames(x: jax.Array, frames: int) -> jax.Array:
  """``[B * F, H, W, C]`` -> ``[B * H * W, F, C]`` (one sequence over frames per pixel)."""
  bf, h, w, c = x.shape
  return x.reshape(bf // frames, frames, h, w, c).transpose(0, 2, 3, 1, 4).reshape(-1, frames, c)


def _from_frames(y: jax.Array, frames: int, h: int, w: int) -> jax.Array:
  """Inverse of :func:`_to_frames`."""
  c = y.shape[-1]
  return y.reshape(-1, h, w, frames, c).transpose(0, 3, 1, 2, 4).reshape(-1, h, w, c)


class MotionModule(_Module):
  """AnimateDiff temporal transformer (diffusers ``AnimateDiffTransformer3D``).

  GroupNorm over (frames, rows, columns) per channel group, ``proj_in``, a
  transformer block attending over frames at each pixel, ``proj_out``
  (zero-initialised: identity at init), residual.
  """

  frames: int = 1  # frames per sample (the batch is B * frames)
  heads: int = 8  # attention heads
  groups: int = 32  # GroupNorm groups
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B * F, H, W, C]`` -> same."""
    bf, h, w, c = x.shape
    y = x.reshape(bf // self.frames, self.frames, h, w, c)
    y = _group_norm(self.groups, _TRANSFORMER_NORM_EPS, self.dtype, self.param_dtype, "norm")(y)
    y = _to_frames(y.reshape(bf, h, w, c), self.frames)
    y = self.dense(c, "proj_in")(y)
    y = TransformerBlock(self.dtype, self.param_dtype, self.heads, cross_attention=False,
                         positions=True, attention_impl=self.attention_impl,
                         name="transformer_blocks_0")(y)
    y = self.dense(c, "proj_out", kernel_init=_zeros)(y)
    return x + _from_frames(y, self.frames, h, w)


class TemporalConv(_Module):
  """EMU-Video temporal adapter: ``x + Conv1d_k3(silu(GroupNorm(x)))`` over frames.

  The GroupNorm pools each channel group over (frames, rows, columns), as
  video GroupNorms do; the convolution is zero-initialised (identity at init)
  and zero-padded over frames.
  """

  frames: int = 1  # frames per sample (the batch is B * frames)
  groups: int = 32  # GroupNorm groups
  eps: float = 1e-5  # GroupNorm epsilon

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B * F, H, W, C]`` -> same."""
    bf, h, w, c = x.shape
    y = x.reshape(bf // self.frames, self.frames, h, w, c)
    y = nn.silu(_group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm")(y))
    y = _to_frames(y.reshape(bf, h, w, c), self.frames)
    y = nn.Conv(c, (3,), padding=((1, 1),), dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=_zeros, bias_init=_zeros, name="conv")(y)
    return x + _from_frames(y, self.frames, h, w)


class ResnetBlock(_Module):
  """diffusers ``ResnetBlock2D`` (+ optional temporal convs after conv1 and conv2)."""

  arch: UNetArch = UNetArch()  # model shape
  features: int = 0  # output channels
  frames: int = 1  # frames per sample

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    """``x: [B * F, H, W, C_in]``, ``temb: [B * F, T]`` -> ``[B * F, H, W, features]``."""
    a = self.arch
    norm = lambda name: _group_norm(a.norm_num_groups, a.norm_eps, self.dtype, self.param_dtype,
                                    name)
    temporal = lambda name: TemporalConv(self.dtype, self.param_dtype, self.frames,
                                         a.norm_num_groups, a.norm_eps, name=name)
    h = self.conv(self.features, "conv1")(nn.silu(norm("norm1")(x)))
    if a.temporal_conv:
      h = temporal("temporal_conv1")(h)
    h = h + self.dense(self.features, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
    h = self.conv(self.features, "conv2")(nn.silu(norm("norm2")(h)))
    if a.temporal_conv:
      h = temporal("temporal_conv2")(h)
    if x.shape[-1] != self.features:
      x = self.conv(self.features, "conv_shortcut", kernel=1)(x)
    return x + h


class _BlockBase(_Module):
  arch: UNetArch = UNetArch()  # model shape
  frames: int = 1  # frames per sample
  attention_impl: str | None = None  # see layers.attention

  def resnet(self, features: int, name: str) -> ResnetBlock:
    return ResnetBlock(self.dtype, self.param_dtype, self.arch, features, self.frames, name=name)

  def attention(self, name: str) -> SpatialTransformer:
    a = self.arch
    return SpatialTransformer(self.dtype, self.param_dtype, a.attention_heads, a.norm_num_groups,
                              a.use_linear_projection, self.attention_impl, name=name)

  def motion(self, name: str) -> MotionModule:
    a = self.arch
    return MotionModule(self.dtype, self.param_dtype, self.frames, a.motion_heads,
                        a.norm_num_groups, self.attention_impl, name=name)


class DownBlock(_BlockBase):
  """``CrossAttnDownBlock2D`` / ``DownBlock2D`` (+ motion modules after each layer)."""

  level: int = 0  # resolution level

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array):
    """Returns ``(x, skips)``: the output and the skip tensors, in order."""
    a = self.arch
    features = a.block_out_channels[self.level]
    skips = []
    for j in range(a.layers_per_block):
      x = self.resnet(features, f"resnets_{j}")(x, temb)
      if a.attention_levels[self.level]:
        x = self.attention(f"attentions_{j}")(x, context)
      if a.motion_modules:
        x = self.motion(f"motion_modules_{j}")(x)
      skips.append(x)
    if self.level < a.levels - 1:
      x = _Resample(self.dtype, self.param_dtype, features, down=True, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(_BlockBase):
  """``UNetMidBlock2DCrossAttn``: resnet, attention, [motion module], resnet."""

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    a = self.arch
    features = a.block_out_channels[-1]
    x = self.resnet(features, "resnets_0")(x, temb)
    x = self.attention("attentions_0")(x, context)
    if a.motion_modules and a.motion_mid_block:
      x = self.motion("motion_modules_0")(x)
    return self.resnet(features, "resnets_1")(x, temb)


class UpBlock(_BlockBase):
  """``CrossAttnUpBlock2D`` / ``UpBlock2D``: each layer takes the last skip tensor."""

  index: int = 0  # up block number (level = levels - 1 - index)

  @nn.compact
  def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
               context: jax.Array) -> jax.Array:
    a = self.arch
    level = a.levels - 1 - self.index
    features = a.block_out_channels[level]
    skips = list(skips)
    for j in range(a.layers_per_block + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self.resnet(features, f"resnets_{j}")(x, temb)
      if a.attention_levels[level]:
        x = self.attention(f"attentions_{j}")(x, context)
      if a.motion_modules:
        x = self.motion(f"motion_modules_{j}")(x)
    if level > 0:
      x = _Resample(self.dtype, self.param_dtype, features, down=False, name="upsamplers_0")(x)
    return x


class _Resample(_Module):
  """``Downsample2D`` (3x3 conv, stride 2, padding 1) or ``Upsample2D`` (nearest 2x, 3x3 conv)."""

  features: int = 0  # output channels
  down: bool = True  # halve (else double) the resolution

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.down:
      return self.conv(self.features, "conv", stride=2)(x)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(self.features, "conv")(x)


class TimeEmbedding(_Module):
  """``linear_1 -> silu -> linear_2`` on the sinusoidal timestep features."""

  features: int = 0  # embedding width

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    return self.dense(self.features, "linear_2")(nn.silu(self.dense(self.features, "linear_1")(t)))


class UNet(nn.Module):
  """Noisy latent frames, timesteps, context tokens -> prediction per frame."""

  arch: UNetArch = UNetArch()  # model shape
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype
  remat: bool = False  # recompute each block in the backward pass (saves activation memory)
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
               condition: jax.Array | None = None) -> jax.Array:
    a = self.arch
    b, f, h, w, c = sample.shape
    if c != a.in_channels:
      raise ValueError(f"sample has {c} channels, the UNet takes {a.in_channels}")
    if h % a.downscale or w % a.downscale:
      raise ValueError(f"sample size {h}x{w} is not divisible by {a.downscale}")
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != a.cross_attention_dim:
      raise ValueError(f"context must be [{b}, L, {a.cross_attention_dim}], got {context.shape}")
    if a.motion_modules and f > a.motion_max_frames:
      raise ValueError(f"{f} frames exceed motion_max_frames={a.motion_max_frames}")
    if condition is not None:
      if not a.condition_channels:
        raise ValueError("condition given to a UNet without condition_channels")
      if condition.shape != (b, f, h, w, a.condition_channels):
        raise ValueError(f"condition must be {(b, f, h, w, a.condition_channels)}, "
                         f"got {condition.shape}")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))

    temb = timestep_embedding(timesteps, a.block_out_channels[0], a.flip_sin_to_cos, a.freq_shift)
    temb = TimeEmbedding(self.dtype, self.param_dtype, a.time_embed_dim,
                         name="time_embedding")(temb)
    # Frames are folded into the batch, frame index fastest.
    temb = jnp.repeat(temb, f, axis=0)
    context = jnp.repeat(context, f, axis=0)

    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda features, name, **kw: nn.Conv(
        features, (3, 3), padding=((1, 1), (1, 1)), name=name, **common,
        **{"kernel_init": _torch_init, **kw})
    x = conv(a.block_out_channels[0], "conv_in")(sample.reshape(b * f, h, w, c))
    if a.condition_channels and (condition is not None or self.is_initializing()):
      if condition is None:
        condition = jnp.zeros((b, f, h, w, a.condition_channels), sample.dtype)
      # Zero-initialised extra input channels of conv_in (see the module docstring).
      x = x + conv(a.block_out_channels[0], "conv_in_cond", use_bias=False, kernel_init=_zeros)(
          condition.reshape(b * f, h, w, a.condition_channels))

    wrap = nn.remat if self.remat else (lambda cls: cls)
    blocks = dict(arch=a, frames=f, attention_impl=self.attention_impl, **common)
    skips = [x]
    for i in range(a.levels):
      x, block_skips = wrap(DownBlock)(level=i, name=f"down_blocks_{i}", **blocks)(x, temb, context)
      skips.extend(block_skips)
    x = wrap(MidBlock)(name="mid_block", **blocks)(x, temb, context)
    for i in range(a.levels):
      n = a.layers_per_block + 1
      x = wrap(UpBlock)(index=i, name=f"up_blocks_{i}", **blocks)(
          x, tuple(skips[-n:]), temb, context)
      del skips[-n:]

    x = nn.silu(_group_norm(a.norm_num_groups, a.norm_eps, self.dtype, self.param_dtype,
                            "conv_norm_out")(x))
    x = conv(a.out_channels, "conv_out")(x)
    return x.reshape(b, f, h, w, a.out_channels).astype(jnp.float32)


def _dummy_inputs(arch: UNetArch, frames: int, size: int | None):
  size = size or arch.downscale
  sample = jnp.zeros((1, frames, size, size, arch.in_channels), jnp.float32)
  context = jnp.zeros((1, 1, arch.cross_attention_dim), jnp.float32)
  return sample, jnp.zeros((1,), jnp.int32), context


def init_params(arch: UNetArch, rng: jax.Array, *, frames: int = 2, size: int | None = None):
  """Random parameters of a UNet (adapters at identity), float32.

  ``frames`` and ``size`` (latent side, default the smallest allowed) only
  set the dummy input; parameter shapes do not depend on them.
  """
  frames = min(frames, arch.motion_max_frames) if arch.motion_modules else frames
  inputs = _dummy_inputs(arch, frames, size)
  return jax.jit(lambda rng: UNet(arch).init(rng, *inputs)["params"])(rng)


def param_shapes(arch: UNetArch):
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
  return jax.eval_shape(lambda rng: init_params(arch, rng), jax.random.key(0))


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def is_adapter(path: str) -> bool:
  """Whether a ``/``-joined parameter path belongs to a video adapter."""
  return re.fullmatch(ADAPTER_PATTERN, path) is not None


def adapter_mask(params):
  """A tree of bools shaped like ``params``: True for adapter leaves (e.g. for ``optax.masked``)."""
  return flax.traverse_util.path_aware_map(lambda path, _: is_adapter("/".join(path)), params)


def init_adapter_params(arch: UNetArch, rng: jax.Array):
  """Freshly initialised adapter leaves only (a nested dict), without initialising the rest.

  The full init is traced, but only adapter leaves are outputs, so XLA drops
  the image model's initialisation.
  """

  def adapters(rng):
    flat = flax.traverse_util.flatten_dict(init_params(arch, rng), sep="/")
    return flax.traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if is_adapter(k)}, sep="/")

  return jax.jit(adapters)(rng)
