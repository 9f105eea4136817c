"""The triplane field: plane sampling and the small MLP that decodes features.

Conventions (see the README's "Conventions" section):

* Planes are ``[N, 3, H, W, C]`` (channels last). Plane 0 is XY, plane 1 is XZ,
  plane 2 is ZY; a point ``(x, y, z)`` in the box ``[-1, 1]^3`` lands on plane 0
  at ``(x, y)``, on plane 1 at ``(x, z)`` and on plane 2 at ``(z, y)``, where
  the first coordinate indexes the width and the second the height.
* Sampling is bilinear with zero padding and ``align_corners=False``, exactly
  PyTorch's ``grid_sample``: a normalised coordinate ``g`` maps to the pixel
  coordinate ``((g + 1) * size - 1) / 2``. Points at ``+-1`` therefore read
  half of a zero border.
* The decoder MLP turns the concatenated ``[f_xy, f_xz, f_zy]`` features into a
  raw density (channel 0) and colours ``sigmoid(x) * 1.002 - 0.001``.

Everything here is a pure function of arrays so the renderer, the mesh
extraction and training share one definition.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

# (width axis, height axis) of each plane, as indices into (x, y, z).
PLANE_AXES = ((0, 1), (0, 2), (2, 1))
# Colour activation of the released decoder: sigmoid stretched by 0.1%.
RGB_PADDING = 0.001


def project_to_planes(points: jax.Array, box_size: float = 2.0) -> jax.Array:
  """Projects points onto the three planes.

  Args:
    points: ``[..., 3]`` world coordinates.
    box_size: side of the cube the planes span (the upstream ``box_warp``).

  Returns:
    ``[..., 3, 2]`` normalised plane coordinates ``(u, v)``; ``u`` indexes the
    width and ``v`` the height of each plane, ``[-1, 1]`` inside the box.
  """
  points = points * (2.0 / box_size)
  return jnp.stack([points[..., jnp.array(axes)] for axes in PLANE_AXES], axis=-2)


def grid_sample(image: jax.Array, coords: jax.Array) -> jax.Array:
  """Bilinear sampling with PyTorch ``grid_sample`` semantics.

  ``mode='bilinear', padding_mode='zeros', align_corners=False``.

  Args:
    image: ``[H, W, C]``.
    coords: ``[..., 2]`` normalised ``(u, v)``; ``u`` indexes the width.

  Returns:
    ``[..., C]`` samples, in ``image.dtype``.
  """
  height, width, channels = image.shape
  # A one-pixel zero border makes out-of-range corners read zeros without
  # masks: indices are shifted by one and clipped into the padded image.
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0))).reshape(-1, channels)
  indices, weights = _bilinear_taps(coords, height, width)
  corner = lambda k: jnp.take(padded, indices[k], axis=0).astype(jnp.float32)
  out = (corner(0) * weights[0][..., None] + corner(1) * weights[1][..., None]
         + corner(2) * weights[2][..., None] + corner(3) * weights[3][..., None])
  return out.astype(image.dtype)


def _bilinear_taps(coords: jax.Array, height: int, width: int):
  """The four corners of ``grid_sample``'s bilinear taps in a zero-bordered image.

  Args:
    coords: ``[..., 2]`` normalised ``(u, v)``; ``u`` indexes the width.
    height, width: the image's size before its one-pixel zero border.

  Returns:
    ``(indices, weights)``: four ``[...]`` int32 flat indices into the
    ``(height + 2) x (width + 2)`` bordered image (out-of-range corners
    clipped onto the border) and their four ``[...]`` float32 weights, in the
    order ``(y0, x0), (y0, x1), (y1, x0), (y1, x1)``.
  """
  coords = coords.astype(jnp.float32)
  px = ((coords[..., 0] + 1.0) * width - 1.0) * 0.5
  py = ((coords[..., 1] + 1.0) * height - 1.0) * 0.5
  x0 = jnp.floor(px)
  y0 = jnp.floor(py)
  wx1 = px - x0
  wy1 = py - y0
  wx0 = 1.0 - wx1
  wy0 = 1.0 - wy1
  x0 = x0.astype(jnp.int32) + 1
  y0 = y0.astype(jnp.int32) + 1

  def index(y, x):
    return jnp.clip(y, 0, height + 1) * (width + 2) + jnp.clip(x, 0, width + 1)

  indices = (index(y0, x0), index(y0, x0 + 1), index(y0 + 1, x0), index(y0 + 1, x0 + 1))
  weights = (wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1)
  return indices, weights


def sample_triplane(planes: jax.Array, points: jax.Array, box_size: float = 2.0,
                    gather: str = "per_plane") -> jax.Array:
  """Samples one triplane at points.

  Args:
    planes: ``[3, H, W, C]``.
    points: ``[..., 3]``.
    box_size: side of the cube the planes span.
    gather: ``"per_plane"``, three :func:`grid_sample` calls (four gathers
      each); ``"one"``, :func:`sample_triplane_one_gather`.

  Returns:
    ``[..., 3 * C]`` features ordered ``[f_xy, f_xz, f_zy]``.
  """
  if gather == "one":
    return sample_triplane_one_gather(planes, points, box_size)
  if gather != "per_plane":
    raise ValueError(f"gather must be 'per_plane' or 'one', got {gather!r}")
  coords = project_to_planes(points, box_size)
  feats = [grid_sample(planes[i], coords[..., i, :]) for i in range(3)]
  return jnp.concatenate(feats, axis=-1)


def sample_triplane_one_gather(planes: jax.Array, points: jax.Array,
                               box_size: float = 2.0) -> jax.Array:
  """:func:`sample_triplane` with the three planes' twelve corners in one gather.

  Each plane is :func:`grid_sample` (the same zero border, weights and
  rounding, up to the order XLA fuses the sums in); the three padded planes
  are laid end to end in one table so that all corners of all planes are read
  by a single ``take``. On CPUs it is the slower form (XLA materialises the
  ``[..., 3, 4, C]`` corners instead of fusing the gathers into the sum:
  139 ms against 80 ms for 131,072 points of 3 x 64 x 64 x 80 planes on 2
  cores); ``RenderOptions.plane_gather`` picks it where it pays.

  Args:
    planes: ``[3, H, W, C]``.
    points: ``[..., 3]``.
    box_size: side of the cube the planes span.

  Returns:
    ``[..., 3 * C]`` features ordered ``[f_xy, f_xz, f_zy]``.
  """
  _, height, width, channels = planes.shape
  table = jnp.pad(planes, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, channels)
  coords = project_to_planes(points, box_size)  # [..., 3, 2]
  taps, weights = _bilinear_taps(coords, height, width)
  base = jnp.arange(3, dtype=jnp.int32) * ((height + 2) * (width + 2))  # each plane's offset
  indices = jnp.stack(taps, axis=-1) + base[:, None]  # [..., 3, 4]
  weights = jnp.stack(weights, axis=-1)
  corners = jnp.take(table, indices, axis=0).astype(jnp.float32)  # [..., 3, 4, C]
  out = (corners[..., 0, :] * weights[..., 0, None] + corners[..., 1, :] * weights[..., 1, None]
         + corners[..., 2, :] * weights[..., 2, None] + corners[..., 3, :] * weights[..., 3, None])
  return out.astype(planes.dtype).reshape(out.shape[:-2] + (3 * channels,))


def decoder_layer_names(decoder_params: Mapping[str, Mapping[str, jax.Array]]):
  """The decoder's Dense layers in order (``net_0``, ``net_2``, ...)."""
  return sorted(decoder_params, key=lambda name: int(name.rsplit("_", 1)[1]))


def decode_features(decoder_params: Mapping[str, Mapping[str, jax.Array]],
                    features: jax.Array, dtype=jnp.float32):
  """Runs the decoder MLP: ReLU between Dense layers, none after the last.

  Args:
    decoder_params: ``{"net_0": {"kernel", "bias"}, "net_2": ..., ...}``.
    features: ``[..., 3 * C]``.
    dtype: compute dtype of the matmuls (accumulation stays float32).

  Returns:
    ``(raw_density [...], rgb [..., 3])`` in float32; the density is the raw
    network output, before any activation.
  """
  names = decoder_layer_names(decoder_params)
  x = features.astype(dtype)
  for i, name in enumerate(names):
    layer = decoder_params[name]
    x = jnp.dot(x, layer["kernel"].astype(dtype),
                preferred_element_type=jnp.float32) + layer["bias"]
    if i < len(names) - 1:
      x = jax.nn.relu(x).astype(dtype)
  raw_density = x[..., 0]
  rgb = jax.nn.sigmoid(x[..., 1:]) * (1 + 2 * RGB_PADDING) - RGB_PADDING
  return raw_density, rgb


def density_activation(raw_density: jax.Array) -> jax.Array:
  """The released model's density activation, ``softplus(raw - 1)``."""
  return jax.nn.softplus(raw_density - 1.0)


def query_field(decoder_params, planes: jax.Array, points: jax.Array,
                box_size: float = 2.0):
  """Raw density and colour of one triplane at points.

  Args:
    decoder_params: the ``synthesizer/decoder`` parameters.
    planes: ``[3, H, W, C]``.
    points: ``[..., 3]``.
    box_size: side of the cube the planes span.

  Returns:
    ``(raw_density [...], rgb [..., 3])``.
  """
  return decode_features(decoder_params, sample_triplane(planes, points, box_size))


def density_rgb(params, planes: jax.Array, points: jax.Array,
                box_size: float = 2.0):
  """Activated density and colour at points, the query meshes are built from.

  Args:
    params: the LRM's parameters (``{"synthesizer": {"decoder": ...}, ...}``)
      or the decoder's own.
    planes: ``[N, 3, H, W, C]``.
    points: ``[N, ..., 3]``.
    box_size: side of the cube the planes span.

  Returns:
    ``(density [N, ...], rgb [N, ..., 3])``; density is ``softplus(raw - 1)``.
  """
  decoder_params = params
  if "synthesizer" in decoder_params:
    decoder_params = decoder_params["synthesizer"]
  if "decoder" in decoder_params:
    decoder_params = decoder_params["decoder"]
  raw, rgb = jax.vmap(lambda p, x: query_field(decoder_params, p, x, box_size))(
      planes, points)
  return density_activation(raw), rgb


class _LinearParams(nn.Module):
  """Declares one Dense layer's ``kernel`` and ``bias`` and returns them."""

  in_dim: int  # input features
  out_dim: int  # output features
  gain: float  # kernel variance is gain / in_dim

  @nn.compact
  def __call__(self):
    init = nn.initializers.variance_scaling(self.gain, "fan_in", "truncated_normal")
    return {"kernel": self.param("kernel", init, (self.in_dim, self.out_dim)),
            "bias": self.param("bias", nn.initializers.zeros, (self.out_dim,))}


class TriplaneDecoder(nn.Module):
  """The decoder MLP, its layers named after the released ``net.{i}``.

  Initialisation (it matters only when training from scratch; released weights
  replace it): He-normal kernels before each ReLU, LeCun-normal for the output
  layer, zero biases, so a unit-variance feature keeps unit variance through
  the hidden layers. PyTorch's default ``nn.Linear`` initialisation (variance
  ``1 / (3 fan_in)``, uniform biases) shrinks the signal about 2.4x per ReLU
  layer: with it, the raw density of a fresh tiny decoder (48 -> 32 -> 32 -> 32
  -> 4) varies by 0.024 over unit-variance random features (0.55 with this
  initialisation) and its gradient with respect to the features is 25x smaller
  (norm 0.034 against 0.86). The field then ignores the planes, and every
  parameter upstream of them learns that much slower until the decoder has
  grown (``tests/training/test_memorisation.py``).
  """

  hidden: int = 64  # width of the hidden layers
  layers: int = 4  # number of Dense layers (released: 4)
  out: int = 4  # raw density + rgb

  @nn.compact
  def __call__(self, features: jax.Array):
    params = {}
    in_dim = features.shape[-1]
    for i in range(self.layers):
      out_dim = self.out if i == self.layers - 1 else self.hidden
      # He initialisation before each ReLU, LeCun for the output, zero biases: the field
      # starts as a function of the planes (see the class docstring).
      gain = 1.0 if i == self.layers - 1 else 2.0
      params[f"net_{2 * i}"] = _LinearParams(in_dim, out_dim, gain, name=f"net_{2 * i}")()
      in_dim = out_dim
    return decode_features(params, features)
