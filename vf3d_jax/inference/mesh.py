"""Mesh extraction from a triplane field: density grid, marching cubes, export.

As upstream (spec section 6): the activated density is sampled on a
``resolution^3`` grid over ``[-1, 1]^3`` (``linspace``, ``ij`` indexing, array
axes = x, y, z), PyMCubes extracts the ``threshold`` level set (1.0), vertex
index coordinates map back by ``v / (resolution - 1) * 2 - 1`` and each vertex
takes the decoder's colour at its position. PyMCubes returns vertices in array
index order, so with ``ij`` indexing vertex column 0 is x, 1 is y, 2 is z.

A query function maps points ``[M, 3]`` float32 to ``(density [M], rgb [M,
3])``; ``field_query_fn`` builds one from the model's parameters and planes.
Points go through it in fixed-size chunks (the last one padded), so it is
compiled once and memory stays bounded at any resolution. ``progress`` shows
a bar over the grid's chunks: ``True`` always, ``False`` never, ``None`` only
when stderr is a terminal.

``density_grid_coarse_to_fine`` gives the same grid for a fraction of the
queries: the field on every ``block``-th grid point first, then the full
resolution only in the blocks the surface can cross (and their neighbours);
everywhere else the grid holds the coarse values trilinearly interpolated, so
marching cubes finds no surface there and, inside the band, the full grid's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from vf3d_jax.models.triplane import density_rgb

QueryFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]

# One 512 x 512 x-slab per call: ~1.3 GB of intermediates for the released
# model's 80-channel planes.
DEFAULT_CHUNK = 512 * 512
MESH_FORMATS = (".obj", ".glb", ".ply")


class EmptyMeshError(ValueError):
  """The density never crosses the threshold, so there is no surface."""


@dataclasses.dataclass(frozen=True)
class Mesh:
  """A triangle mesh with per-vertex colours and, once baked, a UV texture."""

  vertices: np.ndarray  # [V, 3] float32 world coordinates, in [-1, 1]^3
  faces: np.ndarray  # [F, 3] int64 vertex indices
  vertex_colors: np.ndarray  # [V, 3] float32 RGB in [0, 1]
  uv: np.ndarray | None = None  # [V, 2] float32 texture coordinates (texture.py)
  texture: np.ndarray | None = None  # [S, S, 3] float32 RGB in [0, 1]

  @property
  def textured(self) -> bool:
    return self.uv is not None and self.texture is not None


def _field_query(params, planes, points, box_size):
  density, rgb = density_rgb(params, planes[None], points[None], box_size)
  return density[0], rgb[0]


_field_query_jit = jax.jit(_field_query, static_argnames="box_size")


def field_query_fn(params, planes: jax.Array, box_size: float = 2.0) -> QueryFn:
  """The query function of one reconstructed object.

  Args:
    params: the LRM's parameters, the decoder's, or Flax variables
      ``{"params": ...}`` of either (whatever ``density_rgb`` accepts).
    planes: ``[3, H, W, C]`` (or ``[1, 3, H, W, C]``) triplanes.
    box_size: side of the cube the planes span.

  Returns:
    A jitted ``points [M, 3] -> (density [M], rgb [M, 3])``; parameters and
    planes are arguments of the compiled function, not baked-in constants.
  """
  if "params" in params and "synthesizer" not in params and "decoder" not in params:
    params = params["params"]
  planes = jnp.asarray(planes)
  if planes.ndim == 5:
    if planes.shape[0] != 1:
      raise ValueError(f"one object at a time: planes {planes.shape}")
    planes = planes[0]
  if planes.ndim != 4 or planes.shape[0] != 3:
    raise ValueError(f"planes must be [3, H, W, C], got {planes.shape}")
  return functools.partial(_field_query_jit, params, planes, box_size=box_size)


def grid_coordinates(resolution: int) -> np.ndarray:
  """The ``[resolution]`` float32 sample positions along each axis."""
  return np.linspace(-1.0, 1.0, resolution, dtype=np.float32)


@functools.partial(jax.jit, static_argnames="chunk")
def _grid_chunk(start: jax.Array, axis_values: jax.Array, chunk: int) -> jax.Array:
  """Points ``start .. start + chunk - 1`` of the flattened ``ij`` grid.

  The flat index is ``(i * R + j) * R + k`` with x slowest, so a chunk is a
  run of x-slabs; indices past the end repeat the last point (padding).
  """
  resolution = axis_values.shape[0]
  flat = jnp.minimum(start + jnp.arange(chunk, dtype=jnp.int32), resolution ** 3 - 1)
  return _flat_points(flat, axis_values)


def _flat_points(flat: jax.Array, axis_values: jax.Array) -> jax.Array:
  """The ``ij`` grid's points at flat indices ``(i * R + j) * R + k``."""
  resolution = axis_values.shape[0]
  i = flat // (resolution * resolution)
  j = (flat // resolution) % resolution
  k = flat % resolution
  return jnp.stack([axis_values[i], axis_values[j], axis_values[k]], axis=-1)


@functools.partial(jax.jit, static_argnames="chunk")
def _indexed_chunk(flat: jax.Array, start: jax.Array, axis_values: jax.Array,
                   chunk: int) -> jax.Array:
  """The grid points at ``flat[start:start + chunk]`` (``flat`` padded to whole chunks)."""
  return _flat_points(jax.lax.dynamic_slice(flat, (start,), (chunk,)), axis_values)


def _check_resolution(resolution: int) -> None:
  if resolution ** 3 >= 2 ** 31:
    raise ValueError(f"resolution {resolution} too large for int32 indexing")


def _run_chunks(query_fn: QueryFn, points_fn: Callable[[int], jax.Array], count: int,
                chunk: int, store: Callable[[int, np.ndarray], None], progress: bool | None,
                desc: str) -> None:
  """Densities of ``count`` points, ``chunk`` at a time, each handed to ``store``.

  ``points_fn(start)`` gives the ``[chunk, 3]`` points from ``start`` (padded
  past ``count``); ``store(start, density)`` receives the unpadded densities.
  A chunk's densities are copied to the host while the next chunk runs.
  """
  pending = None  # the previous chunk, copied out while the next one runs
  starts = tqdm.trange(0, count, chunk, desc=desc, unit="chunk", leave=False,
                       disable=None if progress is None else not progress)
  for start in starts:
    density = query_fn(points_fn(start))[0]
    if density.shape != (chunk,):
      raise ValueError(f"query_fn returned density {density.shape}, expected ({chunk},)")
    if pending is not None:
      store(pending[0], np.asarray(pending[1])[:count - pending[0]])
    pending = (start, density)
  if pending is not None:
    store(pending[0], np.asarray(pending[1])[:count - pending[0]])


def _product_grid(query_fn: QueryFn, axis_values: np.ndarray, chunk: int,
                  progress: bool | None, desc: str) -> np.ndarray:
  """Density at every ``(x_i, y_j, z_k)`` of ``axis_values^3``, ``[n, n, n]`` float32."""
  size = len(axis_values)
  total = size ** 3
  chunk = int(min(chunk, total))
  axis_values = jnp.asarray(axis_values, jnp.float32)
  grid = np.empty(total, np.float32)

  def store(start, density):
    grid[start:start + len(density)] = density

  _run_chunks(query_fn, lambda start: _grid_chunk(jnp.int32(start), axis_values, chunk), total,
              chunk, store, progress, desc)
  return grid.reshape(size, size, size)


def density_grid(query_fn: QueryFn, resolution: int = 512,
                 chunk: int = DEFAULT_CHUNK, progress: bool | None = None) -> np.ndarray:
  """Density on the ``resolution^3`` grid over ``[-1, 1]^3``.

  Args:
    query_fn: ``points [M, 3] -> (density [M], rgb [M, 3])``, ideally jitted
      (it always sees ``M = chunk``).
    resolution: samples per axis (upstream: 512).
    chunk: points per call (a multiple of ``resolution^2`` keeps calls aligned
      to whole x-slabs).
    progress: a bar over the chunks (see the module docstring).

  Returns:
    ``[R, R, R]`` float32, ``grid[i, j, k]`` = density at ``(x_i, y_j, z_k)``.
  """
  _check_resolution(resolution)
  return _product_grid(query_fn, grid_coordinates(resolution), chunk, progress, "mesh grid")


COARSE_MARGIN = 0.25  # density units; see density_grid_coarse_to_fine


@dataclasses.dataclass(frozen=True)
class GridStats:
  """The work of ``density_grid_coarse_to_fine`` against the full grid's ``R^3`` queries."""

  resolution: int  # R, grid samples per axis
  block: int  # grid intervals per coarse block (the last block of an axis may be shorter)
  coarse_queries: int  # coarse grid points queried: ((R - 2) // block + 2)^3
  fine_queries: int  # full-resolution points queried inside the marked blocks
  padded_queries: int  # points sent to the field with the chunks' padding, both passes
  blocks: int  # coarse blocks in all
  surface_blocks: int  # blocks whose corners straddle or come near the threshold
  marked_blocks: int  # those and their neighbours: the blocks queried at full resolution

  @property
  def full_queries(self) -> int:
    """``R^3``: what ``density_grid`` queries."""
    return self.resolution ** 3

  @property
  def queries(self) -> int:
    """Grid points queried by both passes."""
    return self.coarse_queries + self.fine_queries

  @property
  def query_fraction(self) -> float:
    """``queries / R^3``."""
    return self.queries / self.full_queries

  @property
  def marked_fraction(self) -> float:
    """Fraction of the blocks queried at full resolution."""
    return self.marked_blocks / self.blocks

  def describe(self) -> str:
    return (f"{self.resolution}^3 grid in blocks of {self.block}: {self.queries:,} queries "
            f"({self.coarse_queries:,} coarse + {self.fine_queries:,} fine, "
            f"{self.query_fraction:.1%} of {self.full_queries:,}), "
            f"{self.marked_blocks:,} of {self.blocks:,} blocks ({self.marked_fraction:.1%})")


def coarse_indices(resolution: int, block: int) -> np.ndarray:
  """Grid indices of the coarse samples: ``0, block, 2 block, ...`` and always ``R - 1``."""
  return np.unique(np.append(np.arange(0, resolution, block), resolution - 1))


def _interpolation(coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(lower, upper, weight)`` per grid index: its coarse neighbours (positions in
  ``coarse``) and the float32 weight of the upper one."""
  fine = np.arange(coarse[-1] + 1)
  upper = np.clip(np.searchsorted(coarse, fine, side="right"), 1, len(coarse) - 1)
  lower = upper - 1
  weight = ((fine - coarse[lower]) / (coarse[upper] - coarse[lower])).astype(np.float32)
  return lower, upper, weight


def _fill_trilinear(coarse_grid: np.ndarray, coarse: np.ndarray) -> np.ndarray:
  """The ``[R, R, R]`` grid trilinearly interpolated from the coarse samples.

  Separable: along z, then y for each coarse x-slab, then x for each grid
  x-slab, written in place (the temporaries are ``[n, n, R]`` and
  ``[n, R, R]`` for ``n`` coarse samples a side). Coarse samples keep their
  values exactly (their weights are 0 and 1).
  """
  lower, upper, weight = _interpolation(coarse)
  resolution = len(weight)
  z = coarse_grid[:, :, lower] * (1.0 - weight) + coarse_grid[:, :, upper] * weight
  wy = weight[:, None]
  yz = np.empty((len(coarse), resolution, resolution), np.float32)
  for a in range(len(coarse)):
    np.multiply(z[a][lower], 1.0 - wy, out=yz[a])
    yz[a] += z[a][upper] * wy
  grid = np.empty((resolution,) * 3, np.float32)
  for i in range(resolution):
    np.multiply(yz[lower[i]], 1.0 - weight[i], out=grid[i])
    grid[i] += yz[upper[i]] * weight[i]
  return grid


def _marked_points(marked: np.ndarray, coarse: np.ndarray) -> np.ndarray:
  """``[R, R, R]`` bool: the points of the marked blocks, each block's box closed.

  Block ``(a, b, c)`` spans grid indices ``coarse[a] .. coarse[a + 1]`` (both
  ends) along x and likewise along y and z, so that every marching-cubes cell
  inside it has all eight corners queried.
  """
  resolution = int(coarse[-1]) + 1
  fine = np.arange(resolution)
  # A grid index lies in block `owner` and, on a block boundary, also in the block below it.
  owner = np.clip(np.searchsorted(coarse, fine, side="right") - 1, 0, len(coarse) - 2)
  below = np.where((fine == coarse[owner]) & (owner > 0), owner - 1, owner)
  points = np.zeros((resolution,) * 3, bool)
  for a in np.flatnonzero(marked.any(axis=(1, 2))):
    plane = marked[a]
    slab = (plane[owner][:, owner] | plane[below][:, owner] | plane[owner][:, below]
            | plane[below][:, below])
    points[coarse[a]:coarse[a + 1] + 1] |= slab
  return points


def density_grid_coarse_to_fine(
    query_fn: QueryFn, resolution: int = 512, threshold: float = 1.0, block: int = 8,
    chunk: int = DEFAULT_CHUNK, progress: bool | None = None,
    margin: float = COARSE_MARGIN) -> tuple[np.ndarray, GridStats]:
  """``density_grid``'s grid, queried at full resolution only where the surface can be.

  The coarse samples are the grid points whose indices along every axis are
  ``coarse_indices(resolution, block)``, so they are grid points themselves.
  Neighbouring coarse samples bound a block; a block is marked when its eight
  corner densities straddle ``threshold`` or one comes within ``margin`` of
  it, and then the marks are dilated by one block (26 neighbours), which
  catches surfaces that pass between the coarse samples next to a marked
  block. Every point of a marked block (its box closed, so shared faces are
  exact) is queried; every other point takes the trilinear interpolation of
  its block's corners, which stays on the corners' side of ``threshold``, so
  marching cubes makes no surface there. Where the marked blocks hold the
  whole surface the marching-cubes mesh is the full grid's. A surface
  entirely inside unmarked blocks (a piece thinner than a block that no
  coarse sample comes near) is lost; a larger ``margin`` or smaller ``block``
  guards against that.

  Args:
    query_fn: as for ``density_grid``.
    resolution: samples per axis of the full grid.
    threshold: density level of the surface.
    block: grid intervals between coarse samples (>= 2).
    chunk: points per call in the fine pass; the coarse pass takes at most
      this many, and a fine pass of fewer points takes the next power of two
      (so the query compiles for few sizes).
    progress: bars over the chunks of both passes (see the module docstring).
    margin: marks blocks with a corner within this of ``threshold`` (density
      units; 0 marks only straddling blocks).

  Returns:
    ``(grid, stats)``: the ``[R, R, R]`` float32 grid laid out as
    ``density_grid``'s, and the ``GridStats`` of the work done.
  """
  import scipy.ndimage  # pylint: disable=g-import-not-at-top

  _check_resolution(resolution)
  if resolution < 2:
    raise ValueError(f"resolution must be >= 2, got {resolution}")
  if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 2:
    raise ValueError(f"block must be an integer >= 2, got {block!r}")
  if not margin >= 0:
    raise ValueError(f"margin must be >= 0, got {margin!r}")
  axis = grid_coordinates(resolution)
  coarse = coarse_indices(resolution, int(block))
  values = _product_grid(query_fn, axis[coarse], chunk, progress, "mesh grid (coarse)")
  coarse_chunk = int(min(chunk, values.size))
  padded = -(-values.size // coarse_chunk) * coarse_chunk

  corners = [values[i:values.shape[0] - 1 + i, j:values.shape[1] - 1 + j,
                    k:values.shape[2] - 1 + k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
  low, high = np.minimum.reduce(corners), np.maximum.reduce(corners)
  surface = (high >= threshold - margin) & (low <= threshold + margin)
  marked = scipy.ndimage.binary_dilation(surface, np.ones((3, 3, 3), bool))

  points = _marked_points(marked, coarse)
  points[np.ix_(coarse, coarse, coarse)] = False  # known from the coarse pass
  flat = np.flatnonzero(points).astype(np.int32)
  del points
  count = len(flat)
  filled = []  # the interpolated grid, made while the first fine chunks run

  def grid_flat() -> np.ndarray:
    if not filled:
      filled.append(_fill_trilinear(values, coarse).reshape(-1))
    return filled[0]

  if count:
    fine_chunk = int(min(chunk, 1 << (count - 1).bit_length()))
    padding = -count % fine_chunk
    flat_device = jnp.asarray(np.concatenate([flat, np.full(padding, flat[-1], np.int32)]))
    axis_device = jnp.asarray(axis)

    def store(start, density):
      grid_flat()[flat[start:start + len(density)]] = density

    _run_chunks(query_fn, lambda start: _indexed_chunk(flat_device, jnp.int32(start),
                                                       axis_device, fine_chunk),
                count, fine_chunk, store, progress, "mesh grid (fine)")
    padded += count + padding
  grid = grid_flat().reshape((resolution,) * 3)
  stats = GridStats(resolution=resolution, block=int(block), coarse_queries=int(values.size),
                    fine_queries=count, padded_queries=padded, blocks=int(marked.size),
                    surface_blocks=int(surface.sum()), marked_blocks=int(marked.sum()))
  return grid, stats


def query_colors(query_fn: QueryFn, points: np.ndarray,
                 chunk: int = DEFAULT_CHUNK) -> np.ndarray:
  """Colours at arbitrary points, in fixed-size padded chunks.

  Args:
    query_fn: as for ``density_grid``.
    points: ``[V, 3]``.
    chunk: points per call.

  Returns:
    ``[V, 3]`` float32 clipped to ``[0, 1]`` (the decoder's colours overshoot
    by 0.1%).
  """
  points = np.asarray(points, np.float32)
  count = points.shape[0]
  chunk = int(max(1, min(chunk, count)))
  padded = np.concatenate(
      [points, np.zeros((-count % chunk, 3), np.float32)]) if count % chunk else points
  colors = [np.asarray(query_fn(jnp.asarray(padded[s:s + chunk]))[1])
            for s in range(0, padded.shape[0], chunk)]
  return np.clip(np.concatenate(colors)[:count], 0.0, 1.0).astype(np.float32)


def mesh_from_grid(grid: np.ndarray, query_fn: QueryFn | None = None,
                   threshold: float = 1.0, chunk: int = DEFAULT_CHUNK) -> Mesh:
  """Marching cubes on a density grid, then vertex colours.

  Args:
    grid: ``[R, R, R]`` from ``density_grid`` (axes x, y, z over ``[-1, 1]``).
    query_fn: colours come from it; ``None`` gives mid-grey.
    threshold: density level of the surface (upstream: 1.0).
    chunk: points per colour query.

  Returns:
    The ``Mesh``.

  Raises:
    EmptyMeshError: no grid value crosses ``threshold``.
    ValueError: the grid has NaN or infinite values.
  """
  import mcubes  # pylint: disable=g-import-not-at-top

  grid = np.asarray(grid, np.float32)
  if grid.ndim != 3 or len(set(grid.shape)) != 1:
    raise ValueError(f"expected a cubic [R, R, R] grid, got {grid.shape}")
  if not np.all(np.isfinite(grid)):
    raise ValueError("density grid has NaN or infinite values")
  lo, hi = float(grid.min()), float(grid.max())
  if not lo < threshold < hi:
    raise EmptyMeshError(
        f"no surface: density range [{lo:.4g}, {hi:.4g}] does not cross threshold {threshold}")
  vertices, faces = mcubes.marching_cubes(grid, float(threshold))
  if len(vertices) == 0 or len(faces) == 0:
    raise EmptyMeshError(f"no surface at threshold {threshold}")
  vertices = (vertices / (grid.shape[0] - 1) * 2.0 - 1.0).astype(np.float32)
  if query_fn is None:
    colors = np.full(vertices.shape, 0.5, np.float32)
  else:
    colors = query_colors(query_fn, vertices, chunk)
  return Mesh(vertices, faces.astype(np.int64), colors)


def extract_mesh(query_fn: QueryFn, resolution: int = 512, threshold: float = 1.0,
                 chunk: int = DEFAULT_CHUNK, progress: bool | None = None,
                 coarse_block: int = 0, coarse_margin: float = COARSE_MARGIN) -> Mesh:
  """The density grid, then ``mesh_from_grid``: the object's coloured surface.

  Args:
    query_fn: ``points [M, 3] -> (density [M], rgb [M, 3])``, e.g.
      ``field_query_fn(params, planes)``.
    resolution: grid samples per axis (upstream: 512).
    threshold: density level of the surface (upstream: 1.0).
    chunk: points per query call.
    progress: a bar over the grid's chunks (see the module docstring).
    coarse_block: 0 queries every grid point (``density_grid``); >= 2 queries
      coarse samples this many grid intervals apart and the full resolution
      only near the surface (``density_grid_coarse_to_fine``).
    coarse_margin: ``density_grid_coarse_to_fine``'s ``margin``.

  Raises:
    EmptyMeshError: nothing crosses ``threshold``.
  """
  if coarse_block:
    grid, _ = density_grid_coarse_to_fine(query_fn, resolution, threshold, coarse_block, chunk,
                                          progress, coarse_margin)
  else:
    grid = density_grid(query_fn, resolution, chunk, progress)
  return mesh_from_grid(grid, query_fn, threshold, chunk)


def _merged_vertex_ids(vertices: np.ndarray) -> np.ndarray:
  """Each vertex's index among the distinct positions (marching cubes repeats some)."""
  _, inverse = np.unique(np.round(vertices, 6), axis=0, return_inverse=True)
  return inverse.reshape(-1)


def _compact(mesh: Mesh, keep_faces: np.ndarray) -> Mesh:
  """The mesh of the kept faces, without the vertices they no longer use."""
  faces = mesh.faces[keep_faces]
  used, faces = np.unique(faces.reshape(-1), return_inverse=True)
  return Mesh(mesh.vertices[used], faces.reshape(-1, 3).astype(np.int64),
              mesh.vertex_colors[used])


def remove_floaters(mesh: Mesh, min_fraction: float = 0.01) -> Mesh:
  """Drops the connected pieces with fewer than ``min_fraction`` of the faces.

  Pieces connect through shared vertex positions. The largest piece is always
  kept, so the result is never empty; ``min_fraction=0`` keeps everything.
  """
  return _remove_floaters(mesh, min_fraction)[0]


@dataclasses.dataclass(frozen=True)
class Cleanup:
  """What ``clean`` did to a mesh, for the summary line."""
  raw_faces: int  # from marching cubes
  floaters: int  # pieces removed
  floater_faces: int  # their faces
  faces: int  # after decimation

  def describe(self) -> str:
    parts = [f"{self.faces:,} faces"]
    if self.floaters:
      parts.append(f"{self.floaters} floater{'s' if self.floaters > 1 else ''} of "
                   f"{self.floater_faces:,} faces removed")
    if self.faces < self.raw_faces - self.floater_faces:
      parts.append(f"decimated from {self.raw_faces - self.floater_faces:,}")
    return "; ".join(parts)


def clean(mesh: Mesh, min_fraction: float, max_faces: int, query_fn: QueryFn | None = None,
          chunk: int = DEFAULT_CHUNK) -> tuple[Mesh, Cleanup]:
  """``remove_floaters`` then ``simplify``, and what each removed."""
  kept, floaters = _remove_floaters(mesh, min_fraction)
  out = simplify(kept, max_faces, query_fn, chunk)
  return out, Cleanup(raw_faces=len(mesh.faces), floaters=floaters,
                      floater_faces=len(mesh.faces) - len(kept.faces), faces=len(out.faces))


def _remove_floaters(mesh: Mesh, min_fraction: float) -> tuple[Mesh, int]:
  """``remove_floaters``, and how many pieces it dropped."""
  import scipy.sparse  # pylint: disable=g-import-not-at-top
  import scipy.sparse.csgraph  # pylint: disable=g-import-not-at-top

  if min_fraction <= 0 or len(mesh.faces) == 0:
    return mesh, 0
  ids = _merged_vertex_ids(mesh.vertices)[mesh.faces]  # [F, 3]
  rows = np.concatenate([ids[:, 0], ids[:, 1]])
  cols = np.concatenate([ids[:, 1], ids[:, 2]])
  count = int(ids.max()) + 1
  graph = scipy.sparse.coo_matrix((np.ones(len(rows), np.int8), (rows, cols)),
                                  shape=(count, count))
  _, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
  face_labels = labels[ids[:, 0]]
  sizes = np.bincount(face_labels)
  keep = (sizes >= min_fraction * len(mesh.faces)) | (sizes == sizes.max())
  keep &= sizes > 0  # labels of merged-away vertex ids hold no faces
  removed = int(np.count_nonzero((sizes > 0) & ~keep))
  if removed == 0:
    return mesh, 0
  return _compact(mesh, keep[face_labels]), removed


def simplify(mesh: Mesh, max_faces: int, query_fn: QueryFn | None = None,
             chunk: int = DEFAULT_CHUNK) -> Mesh:
  """Quadric-error decimation (fast-simplification) to at most ``max_faces``.

  The new vertices take the field's colour when ``query_fn`` is given, else
  the colour of the nearest input vertex. ``max_faces <= 0``, or a mesh within
  the budget, returns the mesh unchanged.
  """
  if max_faces <= 0 or len(mesh.faces) <= max_faces:
    return mesh
  import fast_simplification  # pylint: disable=g-import-not-at-top

  merged = to_trimesh(mesh)  # decimation needs shared vertices
  reduction = 1.0 - max_faces / len(merged.faces)
  vertices, faces = fast_simplification.simplify(
      np.asarray(merged.vertices, np.float32), np.asarray(merged.faces, np.int64),
      target_reduction=float(np.clip(reduction, 0.0, 0.999)))
  vertices = np.asarray(vertices, np.float32)
  faces = np.asarray(faces, np.int64)
  if query_fn is not None:
    colors = query_colors(query_fn, vertices, chunk)
  else:
    from scipy.spatial import cKDTree  # pylint: disable=g-import-not-at-top
    _, nearest = cKDTree(mesh.vertices).query(vertices)
    colors = mesh.vertex_colors[nearest]
  return Mesh(vertices, faces, colors.astype(np.float32))


def _texture_image(mesh: Mesh):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return Image.fromarray(np.round(np.clip(mesh.texture, 0.0, 1.0) * 255).astype(np.uint8))


def to_trimesh(mesh: Mesh, textured: bool | None = None, name: str = "vf3d",
               material: str = "pbr"):
  """The ``trimesh.Trimesh`` of the mesh.

  Vertex-coloured (``textured=False``, or a mesh without a texture): duplicate
  vertices merged, as upstream; colours become uint8 RGBA ``round(255 * c)``
  (upstream truncates; at most one level apart). Textured: the UV layout and a
  PBR material whose ``baseColorTexture`` is the texture (not metallic, fully
  rough: the baked colour is what a viewer shows), vertices kept as they are
  (seam vertices must stay split). ``material="simple"`` gives the OBJ/MTL
  material instead: white diffuse times the texture, no ambient or specular.
  """
  import trimesh  # pylint: disable=g-import-not-at-top

  if textured is None:
    textured = mesh.textured
  if textured:
    if not mesh.textured:
      raise ValueError("the mesh has no texture; bake one first (texture.bake_texture)")
    if material == "simple":
      material = trimesh.visual.material.SimpleMaterial(
          name=name, image=_texture_image(mesh), diffuse=(255, 255, 255, 255),
          ambient=(0, 0, 0, 255), specular=(0, 0, 0, 255), glossiness=1.0)
    else:
      material = trimesh.visual.material.PBRMaterial(
          name=name, baseColorTexture=_texture_image(mesh), metallicFactor=0.0,
          roughnessFactor=1.0, doubleSided=False)
    visual = trimesh.visual.TextureVisuals(uv=mesh.uv, material=material)
    return trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, visual=visual,
                           process=False)
  rgb = np.round(np.clip(mesh.vertex_colors, 0.0, 1.0) * 255.0).astype(np.uint8)
  rgba = np.concatenate([rgb, np.full((rgb.shape[0], 1), 255, np.uint8)], axis=1)
  return trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces,
                         vertex_colors=rgba, process=True)


def _write_atomic(path: str, data: bytes) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  handle, temp_path = tempfile.mkstemp(
      dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(handle, "wb") as f:
      f.write(data)
    os.chmod(temp_path, 0o644)  # mkstemp makes it private; a mesh is not
    os.replace(temp_path, path)
  except BaseException:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise


def export_mesh(mesh: Mesh, path: str | os.PathLike) -> list[str]:
  """Writes ``.obj``, ``.glb`` or ``.ply`` (by extension), each file atomically.

  A textured mesh becomes a GLB with the texture embedded as the material's
  ``baseColorTexture``, or an OBJ with ``<stem>.mtl`` and ``<stem>.png`` next
  to it. PLY holds vertex colours only (it has no standard texture), as do
  all three for a mesh without a texture. Every file is written next to its
  destination under a temporary name and renamed into place, so a failure
  never leaves a partial file behind.

  Args:
    mesh: the mesh.
    path: destination; missing folders are created.

  Returns:
    The paths written, the mesh file first.

  Raises:
    ValueError: unknown extension.
    EmptyMeshError: the mesh has no faces.
  """
  path = os.fspath(path)
  extension = os.path.splitext(path)[1].lower()
  if extension not in MESH_FORMATS:
    raise ValueError(f"unknown mesh format {extension or '(none)'!r} for {path}; "
                     f"use one of {', '.join(MESH_FORMATS)}")
  if len(mesh.faces) == 0:
    raise EmptyMeshError(f"refusing to write an empty mesh to {path}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  textured = mesh.textured and extension != ".ply"
  stem = os.path.splitext(os.path.basename(path))[0]
  tm = to_trimesh(mesh, textured, name=stem,
                  material="simple" if extension == ".obj" else "pbr")
  files = {}  # name -> bytes
  if textured and extension == ".obj":
    from trimesh.exchange import obj  # pylint: disable=g-import-not-at-top
    text, extra = obj.export_obj(tm, include_texture=True, return_texture=True,
                                 mtl_name=f"{stem}.mtl", include_normals=False)
    data = text.encode("utf-8")
    files = {name: bytes(content) for name, content in extra.items()}
  else:
    data = tm.export(file_type=extension[1:])
    if isinstance(data, str):
      data = data.encode("utf-8")
  folder = os.path.dirname(os.path.abspath(path))
  written = []
  for name, content in files.items():  # the texture and MTL first: the OBJ refers to them
    target = os.path.join(folder, name)
    _write_atomic(target, content)
    written.append(target)
  _write_atomic(path, data)
  return [path] + written
