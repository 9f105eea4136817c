"""The triplane Large Reconstruction Model of VFusion3D.

``planes = LRM(arch).apply({"params": params}, images, cameras)``

* ``images``: ``[N, H, W, 3]`` RGB in [0, 1] (512x512 for the released model);
* ``cameras``: ``[N, 16]`` source-camera conditioning (see
  ``vf3d_jax.rendering.cameras.camera_conditioning``);
* ``planes``: ``[N, 3, R, R, C]`` float32 triplanes (planes XY, XZ, ZY;
  channels last), ``R = 2 * triplane_res``.

Submodule names mirror the released PyTorch checkpoint (``encoder``,
``camera_embedder``, ``transformer``, ``synthesizer``) so that weight
conversion is a table (``vf3d_jax.weights.vfusion3d``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vf3d_jax.models import layers
from vf3d_jax.models.dinov2 import Dinov2Encoder, EncoderArch
from vf3d_jax.models.triplane import TriplaneDecoder


@dataclasses.dataclass(frozen=True)
class LRMArch:
  """Shape of an LRM (defaults: the released VFusion3D model, 452,135,700 parameters)."""

  encoder: EncoderArch = EncoderArch()  # image encoder
  camera_dim: int = 16  # camera conditioning numbers
  camera_embed_dim: int = 1024  # width of the camera embedding (modulation input)
  width: int = 1024  # triplane transformer width
  layers: int = 16  # triplane transformer blocks
  heads: int = 16  # attention heads of the triplane transformer
  mlp_dim: int = 4096  # hidden width of the transformer MLPs
  eps: float = 1e-6  # LayerNorm epsilon of the transformer
  triplane_res: int = 32  # side of each plane's token grid (upsampled x2)
  triplane_channels: int = 80  # feature channels of the output planes
  decoder_hidden: int = 64  # hidden width of the field decoder MLP
  decoder_layers: int = 4  # Dense layers of the field decoder MLP
  input_size: int = 512  # side of the square input image

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"transformer width {self.width} is not divisible by {self.heads} heads")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LRMArch":
    d = dict(d)
    encoder = EncoderArch(**dict(d.pop("encoder", {})))
    return cls(encoder=encoder, **d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def plane_res(self) -> int:
    return 2 * self.triplane_res


class ModLN(nn.Module):
  """adaLN: ``LayerNorm(x) * (1 + scale) + shift``, ``[shift, scale]`` from the condition."""

  width: int  # token width
  eps: float  # LayerNorm epsilon
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    mod = nn.Dense(2 * self.width, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=layers.torch_linear_init, name="mlp_1")(nn.silu(cond))
    shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
    return layers.layer_norm(self.eps, self.dtype, "norm")(x) * (1 + scale) + shift


class CrossAttention(nn.Module):
  """Multi-head cross-attention, no biases (PyTorch MultiheadAttention(kdim, vdim, bias=False))."""

  width: int  # query/output width
  heads: int  # attention heads
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    dense = lambda name: nn.Dense(self.width, use_bias=False, dtype=self.dtype,
                                  param_dtype=jnp.float32,
                                  kernel_init=nn.initializers.xavier_uniform(), name=name)
    out = layers.attention(dense("q_proj")(x), dense("k_proj")(context), dense("v_proj")(context),
                           self.heads, self.attention_impl)
    return dense("out_proj")(out)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a packed q/k/v projection, no biases."""

  width: int  # token width
  heads: int  # attention heads
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    qkv = nn.Dense(3 * self.width, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=nn.initializers.xavier_uniform(), name="in_proj")(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    out = layers.attention(q, k, v, self.heads, self.attention_impl)
    return nn.Dense(self.width, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=layers.torch_linear_init, name="out_proj")(out)


class TransformerBlock(nn.Module):
  """Cross-attention to the image, self-attention, MLP; each after a ModLN."""

  arch: LRMArch  # model shape
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, cond: jax.Array) -> jax.Array:
    a = self.arch
    x = x + CrossAttention(a.width, a.heads, self.dtype, self.attention_impl, name="cross_attn")(
        ModLN(a.width, a.eps, self.dtype, name="norm1")(x, cond), context)
    x = x + SelfAttention(a.width, a.heads, self.dtype, self.attention_impl, name="self_attn")(
        ModLN(a.width, a.eps, self.dtype, name="norm2")(x, cond))
    h = ModLN(a.width, a.eps, self.dtype, name="norm3")(x, cond)
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                                            kernel_init=layers.torch_linear_init, name=name)
    return x + dense(a.width, "mlp_3")(layers.gelu(dense(a.mlp_dim, "mlp_0")(h)))


class Upsampler(nn.Module):
  """ConvTranspose2d with kernel = stride = 2, per plane.

  With kernel equal to stride the output pixels do not overlap, so it is one
  matmul to ``2 * 2 * C_out`` channels followed by depth-to-space:
  ``out[2h + a, 2w + b, o] = bias[o] + sum_c x[h, w, c] * kernel[c, a, b, o]``.

  The kernel starts with variance ``1 / C_in`` (LeCun): each output pixel sums
  ``C_in`` LayerNormed inputs, so fresh planes have unit variance, the scale the
  field decoder's initialisation is made for (PyTorch's default gives 0.3 here).
  """

  features: int  # output channels
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., H, W, C_in]`` -> ``[..., 2H, 2W, features]`` float32."""
    c_in = x.shape[-1]
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                            out_axis=(1, 2, 3))
    kernel = self.param("kernel", init, (c_in, 2, 2, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = jnp.dot(x.astype(self.dtype), kernel.reshape(c_in, -1).astype(self.dtype),
                preferred_element_type=jnp.float32)
    *lead, h, w, _ = x.shape
    y = y.reshape(*lead, h, w, 2, 2, self.features)
    y = jnp.swapaxes(y, -4, -3).reshape(*lead, 2 * h, 2 * w, self.features)
    return y + bias


class TriplaneTransformer(nn.Module):
  """Learned triplane tokens attending to image tokens, modulated by the camera."""

  arch: LRMArch  # model shape
  dtype: jnp.dtype = jnp.float32  # compute dtype
  attention_impl: str | None = None  # see layers.attention
  remat: bool = False  # recompute each block in the backward pass (saves activation memory)

  @nn.compact
  def __call__(self, context: jax.Array, cond: jax.Array) -> jax.Array:
    """Image tokens ``[N, T, D_img]`` and camera embedding ``[N, D_cam]`` -> planes."""
    a = self.arch
    n, r = context.shape[0], a.triplane_res
    pos_embed = self.param("pos_embed", nn.initializers.normal(a.width ** -0.5),
                           (1, 3 * r * r, a.width))
    x = jnp.broadcast_to(pos_embed, (n,) + pos_embed.shape[1:])
    block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
    for i in range(a.layers):
      x = block(a, self.dtype, self.attention_impl, name=f"layers_{i}")(x, context, cond)
    x = layers.layer_norm(a.eps, self.dtype, "norm")(x)
    # Token index = plane * r * r + row * r + col.
    x = x.reshape(n, 3, r, r, a.width)
    return Upsampler(a.triplane_channels, self.dtype, name="deconv")(x)


class CameraEmbedder(nn.Module):
  """Linear -> SiLU -> Linear on the 16-number camera."""

  features: int  # embedding width
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, cameras: jax.Array) -> jax.Array:
    dense = lambda name: nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32,
                                  kernel_init=layers.torch_linear_init, name=name)
    return dense("mlp_2")(nn.silu(dense("mlp_0")(cameras.astype(jnp.float32))))


class Synthesizer(nn.Module):
  """Holds the triplane field decoder (rendering lives in ``vf3d_jax.rendering``)."""

  arch: LRMArch  # model shape

  @nn.compact
  def __call__(self, features: jax.Array):
    return TriplaneDecoder(self.arch.decoder_hidden, self.arch.decoder_layers, name="decoder")(
        features)


class LRM(nn.Module):
  """Image + source camera -> triplanes."""

  arch: LRMArch = LRMArch()  # model shape
  dtype: jnp.dtype = jnp.float32  # compute dtype (parameters are always float32)
  attention_impl: str | None = None  # see layers.attention
  remat: bool = False  # rematerialise transformer blocks when differentiating

  @nn.compact
  def __call__(self, images: jax.Array, cameras: jax.Array) -> jax.Array:
    a = self.arch
    if cameras.shape != (images.shape[0], a.camera_dim):
      raise ValueError(f"cameras must be [{images.shape[0]}, {a.camera_dim}], got {cameras.shape}")
    tokens = Dinov2Encoder(a.encoder, self.dtype, self.attention_impl, name="encoder")(images)
    cond = CameraEmbedder(a.camera_embed_dim, self.dtype, name="camera_embedder")(cameras)
    planes = TriplaneTransformer(a, self.dtype, self.attention_impl, self.remat,
                                 name="transformer")(tokens, cond)
    if self.is_initializing():
      # The decoder is used by the renderer, not here; create its parameters.
      Synthesizer(a, name="synthesizer")(jnp.zeros((1, 3 * a.triplane_channels), jnp.float32))
    return planes.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(arch: LRMArch, rng: jax.Array, batch: int = 1):
  """Random parameters of an LRM (float32), as one compiled program (op by op, each of the
  hundreds of initialisers would compile on its own: twice the time for the tiny model)."""
  images = jnp.zeros((batch, arch.input_size, arch.input_size, 3), jnp.float32)
  cameras = jnp.zeros((batch, arch.camera_dim), jnp.float32)
  return LRM(arch).init(rng, images, cameras)["params"]


def param_shapes(arch: LRMArch):
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
  return jax.eval_shape(lambda rng: init_params(arch, rng), jax.random.key(0))


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
