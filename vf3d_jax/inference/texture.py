"""UV-textured meshes: unwrap with xatlas, bake the field's colour into an atlas.

``bake_texture(mesh, query_fn)`` turns a vertex-coloured ``Mesh`` into one
with per-corner texture coordinates and a ``[S, S, 3]`` texture:

1. **Unwrap.** xatlas cuts the surface into charts and packs them into the
   unit square. Vertices on chart seams are split, so the textured mesh has
   more vertices than the input (each keeps its position and colour).
2. **Rasterise in UV space.** Every triangle is filled into a triangle-id
   image (OpenCV, sub-pixel vertex positions); each covered texel gets its
   triangle's barycentric coordinates at the texel centre, clipped into the
   triangle for the texels on its border.
3. **Bake.** The texel's surface point (the barycentric blend of the
   triangle's 3D corners) goes through ``query_fn``: the texture holds the
   field's colour where the surface is, not an interpolation of vertex colours,
   so it keeps detail finer than the mesh.
4. **Dilate.** Empty texels next to charts take the mean of their filled
   neighbours, ``dilate`` times, so bilinear lookups and mipmaps at chart
   edges never blend in the empty background.

UV convention (OpenGL, as trimesh and glTF exporters expect): ``u`` runs left
to right, ``v`` bottom to top, so texel row ``y`` of the image is at
``v = 1 - (y + 0.5) / S``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vf3d_jax.inference import mesh as mesh_lib


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int = 1024,
           padding: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """xatlas charts packed into the unit square.

  Args:
    vertices: ``[V, 3]`` float.
    faces: ``[F, 3]`` int.
    texture_size: the atlas resolution the packer plans for (texels).
    padding: texels kept free between charts.

  Returns:
    ``(vmapping [V'], faces [F, 3], uv [V', 2])``: new vertex ``i`` is input
    vertex ``vmapping[i]``, the faces index the new vertices, ``uv`` in
    ``[0, 1]``.
  """
  import xatlas  # pylint: disable=g-import-not-at-top

  atlas = xatlas.Atlas()
  atlas.add_mesh(np.ascontiguousarray(vertices, np.float32),
                 np.ascontiguousarray(faces, np.uint32))
  chart_options = xatlas.ChartOptions()
  chart_options.max_iterations = 1  # one chart-growing pass: 2-3x faster, as compact here
  pack_options = xatlas.PackOptions()
  pack_options.resolution = int(texture_size)
  pack_options.padding = int(padding)
  pack_options.bilinear = True
  atlas.generate(chart_options, pack_options)
  vmapping, new_faces, uv = atlas[0]
  return (vmapping.astype(np.int64), new_faces.astype(np.int64),
          np.clip(uv.astype(np.float32), 0.0, 1.0))


def rasterize(uv: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Which triangle covers each texel, and where.

  Args:
    uv: ``[V, 2]`` in ``[0, 1]`` (OpenGL convention, see the module docstring).
    faces: ``[F, 3]`` indices into ``uv``.
    size: texture side ``S``.

  Returns:
    ``(triangle [S, S] int32, -1 where empty; barycentric [S, S, 3] float32)``,
    the barycentric coordinates of the texel centre in its triangle (zero where
    empty).
  """
  import cv2  # pylint: disable=g-import-not-at-top

  shift = 4  # OpenCV's fixed-point vertex positions: 1/16 texel
  # Texel (x, y) is centred at pixel coordinate (x, y): u * S - 0.5.
  pixels = np.stack([uv[:, 0] * size - 0.5, (1.0 - uv[:, 1]) * size - 0.5], axis=-1)
  fixed = np.round(pixels * (1 << shift)).astype(np.int32)
  ids = np.full((size, size), 0, np.int32)
  for index, corners in enumerate(fixed[faces]):
    cv2.fillConvexPoly(ids, corners, index + 1, lineType=cv2.LINE_8, shift=shift)
  triangle = ids - 1
  ys, xs = np.nonzero(triangle >= 0)
  barycentric = np.zeros((size, size, 3), np.float32)
  if len(xs):
    corners = pixels[faces[triangle[ys, xs]]]  # [N, 3, 2]
    point = np.stack([xs, ys], axis=-1).astype(np.float64)
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    v0, v1, v2 = b - a, c - a, point - a
    d00 = np.sum(v0 * v0, -1)
    d01 = np.sum(v0 * v1, -1)
    d11 = np.sum(v1 * v1, -1)
    d20 = np.sum(v2 * v0, -1)
    d21 = np.sum(v2 * v1, -1)
    denominator = d00 * d11 - d01 * d01
    degenerate = np.abs(denominator) < 1e-12
    denominator = np.where(degenerate, 1.0, denominator)
    w1 = np.where(degenerate, 1 / 3, (d11 * d20 - d01 * d21) / denominator)
    w2 = np.where(degenerate, 1 / 3, (d00 * d21 - d01 * d20) / denominator)
    weights = np.clip(np.stack([1.0 - w1 - w2, w1, w2], axis=-1), 0.0, None)
    weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-12)
    barycentric[ys, xs] = weights
  return triangle, barycentric


def dilate(image: np.ndarray, filled: np.ndarray, steps: int) -> np.ndarray:
  """Grows the filled texels ``steps`` rings outwards (mean of filled neighbours)."""
  import cv2  # pylint: disable=g-import-not-at-top

  image = image.astype(np.float32).copy()
  filled = filled.astype(bool).copy()
  kernel = np.ones((3, 3), np.float32)
  for _ in range(steps):
    weight = cv2.filter2D(filled.astype(np.float32), -1, kernel, borderType=cv2.BORDER_CONSTANT)
    total = cv2.filter2D(image * filled[..., None], -1, kernel, borderType=cv2.BORDER_CONSTANT)
    grow = (~filled) & (weight > 0)
    if not grow.any():
      break
    image[grow] = total[grow] / weight[grow][:, None]
    filled |= grow
  return image


def bake_texture(mesh: mesh_lib.Mesh, query_fn: mesh_lib.QueryFn | None,
                 texture_size: int = 1024, dilate_steps: int = 8,
                 chunk: int = mesh_lib.DEFAULT_CHUNK) -> mesh_lib.Mesh:
  """The mesh with an xatlas UV layout and the field's colour baked into it.

  Args:
    mesh: a ``Mesh`` (vertex colours are carried over to the split vertices).
    query_fn: ``points -> (density, rgb)``; ``None`` bakes the vertex colours
      (barycentric blend) instead of querying a field.
    texture_size: texture side in texels.
    dilate_steps: rings of padding grown around every chart.
    chunk: points per colour query.

  Returns:
    A ``Mesh`` with ``uv [V', 2]`` and ``texture [S, S, 3]`` float32 in [0, 1].
  """
  if len(mesh.faces) == 0:
    raise mesh_lib.EmptyMeshError("cannot texture an empty mesh")
  vmapping, faces, uv = unwrap(mesh.vertices, mesh.faces, texture_size)
  vertices = mesh.vertices[vmapping]
  colors = mesh.vertex_colors[vmapping]
  triangle, barycentric = rasterize(uv, faces, texture_size)
  covered = triangle >= 0
  weights = barycentric[covered][..., None]  # [N, 3, 1]
  corners = faces[triangle[covered]]  # [N, 3]
  texture = np.zeros((texture_size, texture_size, 3), np.float32)
  if query_fn is None:
    texture[covered] = np.sum(colors[corners] * weights, axis=1)
  else:
    points = np.sum(vertices[corners] * weights, axis=1)
    texture[covered] = mesh_lib.query_colors(query_fn, points, chunk)
  texture = np.clip(dilate(texture, covered, dilate_steps), 0.0, 1.0)
  return dataclasses.replace(mesh, vertices=vertices, faces=faces, vertex_colors=colors,
                             uv=uv, texture=texture)


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
  """Bilinear lookup of ``[S, S, C]`` at ``uv [N, 2]`` (the module's convention)."""
  size_y, size_x = texture.shape[:2]
  x = np.clip(uv[:, 0] * size_x - 0.5, 0, size_x - 1)
  y = np.clip((1.0 - uv[:, 1]) * size_y - 0.5, 0, size_y - 1)
  x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
  x1, y1 = np.minimum(x0 + 1, size_x - 1), np.minimum(y0 + 1, size_y - 1)
  fx, fy = (x - x0)[:, None], (y - y0)[:, None]
  top = texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx
  bottom = texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx
  return top * (1 - fy) + bottom * fy
