"""A z-buffer triangle rasteriser in JAX for ``meshes.MeshAsset``.

Pixel centres and cameras follow ``cameras.generate_rays`` exactly: a pixel is
covered when the ray through its centre crosses a triangle, the visible
triangle is the nearest one, and attributes are interpolated with
perspective-correct barycentrics, so a render equals ray casting the mesh.

How it stays static-shaped: every triangle tests a fixed ``W x W`` window of
pixels starting at its (clipped) bounding box. Before rendering, triangles
whose projected box is wider than the window in any view are split in four
(host side, repeatedly), so every triangle fits. The nearest depth per pixel
is a scatter-min; a second scatter picks the triangle that attains it.
Cameras must see the whole mesh from in front (distance to the origin above
``sqrt(3)`` for a normalised mesh); triangles crossing the near plane are
dropped.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax.data import meshes
from vf3d_jax.data import shading

NEAR = 1e-3


def _project(corners, c2w, intrinsics, size, xp):
  """Pixel coordinates ``[..., 3, 2]`` and depths ``[..., 3]`` of corners.

  ``corners`` ``[F, 3, 3]``; one camera ``c2w [4, 4]``, ``intrinsics [4]``.
  """
  rotation, origin = c2w[:3, :3], c2w[:3, 3]
  cam = (corners - origin) @ rotation  # world -> OpenGL camera frame
  depth = -cam[..., 2]
  safe = xp.where(depth > NEAR, depth, 1.0)
  px = (intrinsics[0] * cam[..., 0] / safe + intrinsics[2]) * size
  py = (intrinsics[1] * -cam[..., 1] / safe + intrinsics[3]) * size
  return xp.stack([px, py], axis=-1), depth


def _window_extent(corners: np.ndarray, c2w: np.ndarray, intrinsics: np.ndarray,
                   size: int) -> np.ndarray:
  """``[F]`` largest clipped projected box side (pixels) over the views."""
  extent = np.zeros(corners.shape[0])
  for view in range(c2w.shape[0]):
    pixels, depth = _project(corners.astype(np.float64), c2w[view].astype(np.float64),
                             intrinsics[view].astype(np.float64), size, np)
    lower = np.clip(pixels.min(axis=1), 0, size)
    upper = np.clip(pixels.max(axis=1), 0, size)
    side = np.max(upper - lower, axis=-1)
    side = np.where(np.all(depth > NEAR, axis=1), side, 0.0)
    extent = np.maximum(extent, side)
  return extent


def fit_to_window(mesh: meshes.MeshAsset, c2w: np.ndarray, intrinsics: np.ndarray,
                  size: int, window: int, max_rounds: int = 12) -> meshes.MeshAsset:
  """Subdivides triangles until each fits a ``window``-pixel box in every view.

  Args:
    mesh: the mesh.
    c2w: ``[V, 4, 4]`` cameras the mesh will be rendered from.
    intrinsics: ``[V, 4]`` normalised intrinsics.
    size: rendered side in pixels (after supersampling).
    window: side of the pixel window each triangle tests.
    max_rounds: bound on the number of halvings.

  Raises:
    ValueError: triangles still too large after ``max_rounds``.
  """
  for _ in range(max_rounds):
    too_big = _window_extent(mesh.corners, c2w, intrinsics, size) > window - 1
    if not too_big.any():
      return mesh
    mesh = meshes.subdivide_faces(mesh, too_big)
  if (_window_extent(mesh.corners, c2w, intrinsics, size) > window - 1).any():
    raise ValueError("triangles do not fit the raster window; raise the window")
  return mesh


def pad_mesh_arrays(mesh: meshes.MeshAsset, bucket: int = 1024) -> dict[str, np.ndarray]:
  """Mesh arrays padded with degenerate triangles to a power-of-two count
  (at least ``bucket``), so few shapes are ever compiled."""
  faces = mesh.num_faces
  padded = max(bucket, 1 << math.ceil(math.log2(max(faces, 1))))
  pad = lambda x, value=0: np.concatenate(
      [x, np.full((padded - faces,) + x.shape[1:], value, x.dtype)])
  return {"corners": pad(mesh.corners), "corner_colors": pad(mesh.corner_colors),
          "corner_uvs": pad(mesh.corner_uvs), "face_texture": pad(mesh.face_texture, -1),
          "valid": pad(np.ones(faces, bool), False), "textures": mesh.textures}


def _barycentrics(pixels, px, py):
  """Screen-space barycentrics of points ``(px, py)`` in triangles ``pixels``.

  ``pixels [..., 3, 2]``; ``px, py`` broadcast against ``[...]``. Returns
  ``(w [..., 3], area [...])`` (signed doubled area).
  """
  (x0, y0), (x1, y1), (x2, y2) = [(pixels[..., k, 0], pixels[..., k, 1]) for k in range(3)]
  area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
  safe = jnp.where(jnp.abs(area) > 1e-12, area, 1.0)
  w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / safe
  w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / safe
  return jnp.stack([w0, w1, 1.0 - w0 - w1], axis=-1), area


def _sample_texture(textures, index, uv):
  """Bilinear, wrapping lookup: ``textures [K, T, T, 3]``, ``index [N]``,
  ``uv [N, 2]`` (``v`` up) -> ``[N, 3]``."""
  size_y, size_x = textures.shape[1], textures.shape[2]
  x = uv[:, 0] * size_x - 0.5
  y = (1.0 - uv[:, 1]) * size_y - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = (x - x0)[:, None], (y - y0)[:, None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  def read(xi, yi):
    return textures[index, jnp.mod(yi, size_y), jnp.mod(xi, size_x)]
  return ((1 - fx) * (1 - fy) * read(x0, y0) + fx * (1 - fy) * read(x0 + 1, y0)
          + (1 - fx) * fy * read(x0, y0 + 1) + fx * fy * read(x0 + 1, y0 + 1))


def _raster_view(mesh, c2w, intrinsics, size, window):
  """One view at ``size x size``: ``(rgb [S*S, 3], hit [S*S], depth [S*S])``."""
  corners = mesh["corners"]
  faces = corners.shape[0]
  pixels, depth = _project(corners, c2w, intrinsics, size, jnp)
  usable = mesh["valid"] & jnp.all(depth > NEAR, axis=1)
  start = jnp.ceil(jnp.clip(pixels.min(axis=1), 0, size) - 0.5).astype(jnp.int32)
  offsets = jnp.arange(window, dtype=jnp.int32)
  cols = start[:, 0, None, None] + offsets[None, None, :]      # [F, 1, W]
  rows = start[:, 1, None, None] + offsets[None, :, None]      # [F, W, 1]
  weights, area = _barycentrics(pixels[:, None, None], cols + 0.5, rows + 0.5)
  inside = (jnp.all(weights >= -1e-6, axis=-1) & (jnp.abs(area) > 1e-12)
            & usable[:, None, None] & (cols < size) & (rows < size))
  inv_depth = jnp.sum(weights / depth[:, None, None, :], axis=-1)
  z = 1.0 / jnp.where(inside, inv_depth, 1.0)
  flat = jnp.where(inside, rows * size + cols, size * size)
  zbuffer = jnp.full((size * size,), jnp.inf).at[flat.reshape(-1)].min(
      z.reshape(-1), mode="drop")
  nearest = inside & (z <= zbuffer[jnp.minimum(flat, size * size - 1)])
  face_ids = jnp.broadcast_to(jnp.arange(faces, dtype=jnp.int32)[:, None, None], flat.shape)
  owner = jnp.full((size * size,), -1, jnp.int32).at[
      jnp.where(nearest, flat, size * size).reshape(-1)].max(face_ids.reshape(-1), mode="drop")
  # Interpolate the owning triangle's attributes at each pixel centre.
  hit = owner >= 0
  face = jnp.maximum(owner, 0)
  index = jnp.arange(size * size)
  px, py = (index % size + 0.5).astype(jnp.float32), (index // size + 0.5).astype(jnp.float32)
  weights, _ = _barycentrics(pixels[face], px, py)
  perspective = weights / depth[face]
  perspective = perspective / jnp.sum(perspective, axis=-1, keepdims=True)
  interpolate = lambda attribute: jnp.einsum("nk,nkc->nc", perspective, attribute[face])
  points = interpolate(corners)
  albedo = interpolate(mesh["corner_colors"])
  textured = mesh["face_texture"][face] >= 0
  texel = _sample_texture(mesh["textures"], jnp.maximum(mesh["face_texture"][face], 0),
                          interpolate(mesh["corner_uvs"]))
  albedo = jnp.where(textured[:, None], albedo * texel, albedo)
  edge1 = corners[face, 1] - corners[face, 0]
  edge2 = corners[face, 2] - corners[face, 0]
  normal = jnp.cross(edge1, edge2)
  normal = normal / jnp.maximum(jnp.linalg.norm(normal, axis=-1, keepdims=True), 1e-20)
  view = points - c2w[:3, 3]
  distance = jnp.linalg.norm(view, axis=-1)
  rgb = shading.lambertian(albedo, normal, view / jnp.maximum(distance, 1e-12)[:, None])
  return (jnp.where(hit[:, None], rgb, 0.0), hit, jnp.where(hit, distance, jnp.inf))


@functools.partial(jax.jit, static_argnames=("resolution", "supersample", "window"))
def render_mesh_arrays(mesh: dict, c2w: jax.Array, intrinsics: jax.Array, resolution: int,
                       supersample: int = 1, window: int = 8):
  """Renders padded mesh arrays (``pad_mesh_arrays``) from ``V`` cameras.

  Returns ``(rgba [V, R, R, 4] straight alpha, depth [V, R, R])``.
  """
  size = resolution * supersample
  rgb, hit, depth = jax.lax.map(
      lambda camera: _raster_view(mesh, camera[0], camera[1], size, window), (c2w, intrinsics))
  views = c2w.shape[0]
  return shading.downsample_supersampled(
      rgb.reshape(views, size, size, 3), hit.reshape(views, size, size),
      depth.reshape(views, size, size), supersample)


def render_mesh(mesh: meshes.MeshAsset, c2w, intrinsics, resolution: int,
                supersample: int = 1, window: int = 8):
  """Renders a mesh from ``c2w [V, 4, 4]``, ``intrinsics [V, 4]``.

  Returns ``(rgba [V, R, R, 4] float32 straight alpha, depth [V, R, R])``.
  """
  c2w = np.asarray(c2w, np.float32)
  intrinsics = np.asarray(intrinsics, np.float32)
  fitted = fit_to_window(mesh, c2w, intrinsics, resolution * supersample, window)
  return render_mesh_arrays(pad_mesh_arrays(fitted), c2w, intrinsics, resolution,
                            supersample, window)
