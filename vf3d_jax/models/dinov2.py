"""DINOv2 ViT image encoder, numerically the PyTorch ``transformers.Dinov2Model``.

Input images are ``[N, H, W, 3]`` RGB in ``[0, 1]``; the encoder normalises
them with the ImageNet statistics and returns every token (CLS first) after the
final LayerNorm: ``[N, 1 + (H // p) * (W // p), width]``.

The learned position table covers a ``pos_grid x pos_grid`` patch grid (37x37
for DINOv2, trained at 518 px). Other grids get the table resized with
PyTorch's bicubic, in one of two variants found in checkpoints of the wild:

* ``"legacy"`` (transformers <= 4.44, what VFusion3D was trained with):
  ``scale_factor = (grid + 0.1) / pos_grid``, so the source coordinate of
  output ``d`` is ``(d + 0.5) * pos_grid / (grid + 0.1) - 0.5``;
* ``"current"`` (transformers >= 4.45): ``size = grid``, source coordinate
  ``(d + 0.5) * pos_grid / grid - 0.5``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax.models import layers
from vf3d_jax.ops import resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_RESIZE_MODES = ("legacy", "current")


@dataclasses.dataclass(frozen=True)
class EncoderArch:
  """Shape of a DINOv2 encoder (defaults: ViT-B/14, the released model's)."""

  width: int = 768  # token width
  depth: int = 12  # number of transformer layers
  heads: int = 12  # attention heads
  mlp_dim: int = 3072  # hidden width of the MLPs
  patch_size: int = 14  # side of the square patches
  pos_grid: int = 37  # side of the learned position table's patch grid
  pos_resize: str = "legacy"  # position-table resize: "legacy" or "current"
  eps: float = 1e-6  # LayerNorm epsilon

  def __post_init__(self):
    if self.pos_resize not in POS_RESIZE_MODES:
      raise ValueError(f"pos_resize must be one of {POS_RESIZE_MODES}, got {self.pos_resize!r}")
    if self.width % self.heads:
      raise ValueError(f"encoder width {self.width} is not divisible by {self.heads} heads")


def resize_position_table(table: jax.Array, grid_hw: tuple[int, int], mode: str) -> jax.Array:
  """Resizes a ``[1, 1 + G*G, D]`` position table to a ``grid_hw`` patch grid.

  Returns ``[1, 1 + h*w, D]``; the CLS entry is kept as is.
  """
  source = int(round((table.shape[1] - 1) ** 0.5))
  if (source, source) == tuple(grid_hw):
    return table
  cls, patches = table[:, :1], table[:, 1:].reshape(1, source, source, -1)
  h, w = grid_hw
  if mode == "legacy":
    scale = ((h + 0.1) / source, (w + 0.1) / source)
    size = (resize.scaled_size(source, scale[0]), resize.scaled_size(source, scale[1]))
    if size != (h, w):
      raise ValueError(f"legacy resize of a {source}x{source} table gives {size}, not {(h, w)}")
  else:
    scale = None
  patches = resize.resize_bicubic(patches, (h, w), align_corners=False, scale=scale)
  return jnp.concatenate([cls, patches.reshape(1, h * w, -1).astype(table.dtype)], axis=1)


class PatchEmbeddings(nn.Module):
  """Non-overlapping patches to tokens (a stride-p convolution)."""

  width: int  # output token width
  patch_size: int  # patch side
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=nn.initializers.truncated_normal(0.02),
                name="projection")(pixels)
    return x  # [N, H // p, W // p, width]


class Embeddings(nn.Module):
  """CLS token + patch tokens + (resized) position table."""

  arch: EncoderArch  # encoder shape
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    arch = self.arch
    init = nn.initializers.truncated_normal(0.02)
    cls_token = self.param("cls_token", init, (1, 1, arch.width))
    # Used only by masked-image pre-training; declared so checkpoints round-trip.
    self.param("mask_token", nn.initializers.zeros, (1, arch.width))
    table = self.param("position_embeddings", init, (1, 1 + arch.pos_grid ** 2, arch.width))
    patches = PatchEmbeddings(arch.width, arch.patch_size, self.dtype, name="patch_embeddings")(pixels)
    n, h, w, d = patches.shape
    tokens = jnp.concatenate(
        [jnp.broadcast_to(cls_token, (n, 1, d)).astype(patches.dtype), patches.reshape(n, h * w, d)],
        axis=1)
    return tokens + resize_position_table(table, (h, w), arch.pos_resize).astype(tokens.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v and output projections."""

  width: int  # token width
  heads: int  # attention heads
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda name: nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                                  kernel_init=nn.initializers.truncated_normal(0.02), name=name)
    out = layers.attention(dense("query")(x), dense("key")(x), dense("value")(x), self.heads,
                           self.attention_impl)
    return dense("output")(out)


class EncoderLayer(nn.Module):
  """Pre-LN transformer layer with LayerScale on both branches."""

  arch: EncoderArch  # encoder shape
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    arch = self.arch
    ones = nn.initializers.ones
    h = layers.layer_norm(arch.eps, self.dtype, "norm1")(x)
    h = SelfAttention(arch.width, arch.heads, self.dtype, self.attention_impl, name="attention")(h)
    x = x + h * self.param("layer_scale1", ones, (arch.width,))
    h = layers.layer_norm(arch.eps, self.dtype, "norm2")(x)
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                                            kernel_init=nn.initializers.truncated_normal(0.02),
                                            name=name)
    h = dense(arch.width, "fc2")(layers.gelu(dense(arch.mlp_dim, "fc1")(h)))
    return x + h * self.param("layer_scale2", ones, (arch.width,))


class Dinov2Encoder(nn.Module):
  """DINOv2 encoder: normalised pixels -> all tokens after the final LayerNorm."""

  arch: EncoderArch = EncoderArch()  # encoder shape
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """``[N, H, W, 3]`` in [0, 1] -> ``[N, 1 + (H//p)*(W//p), width]``."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    x = (images.astype(jnp.float32) - mean) / std
    x = Embeddings(self.arch, self.dtype, name="embeddings")(x)
    for i in range(self.arch.depth):
      x = EncoderLayer(self.arch, self.dtype, self.attention_impl, name=f"layer_{i}")(x)
    return layers.layer_norm(self.arch.eps, self.dtype, "layernorm")(x)
