"""Differentiable importance rendering of one triplane.

The released renderer (EG3D's, as modified by OpenLRM: ``ImportanceRenderer``
in facebookresearch/vfusion3d ``lrm/models/rendering/utils/renderer.py``, with
``ray_marcher.py`` and ``math_utils.py`` beside it) for each ray: intersects
the box, takes stratified coarse samples, composites them, draws fine samples
from the smoothed coarse weights, and composites the merged, sorted samples. The maths lives in :mod:`vf3d_jax.rendering.volume`;
this module adds the per-view bookkeeping, randomness, chunking and sharding.

Per-view quantities. The released renderer computes two things over all the
rays of one call: the range given to rays that miss the box and the range the
expected depth is clamped to. The upstream inference renders one view per call,
so here both are computed **per view** (per call of :func:`render_rays`),
whatever the chunking or sharding; sharded rendering reduces them across
devices, so it equals the unsharded result.

Modes (``RenderOptions.mode``):

* ``"compatible"``: as released. A ray that misses the box samples
  ``[min start, max start]`` of the view's hitting rays (``end`` is the
  maximum of the *starts*), or ``[-1, -2]`` when no ray of the view hits; every
  depth is clamped to the minimum and maximum sample depth of the whole view,
  so an empty ray reads the view's farthest sample; a ray starts at the box
  entry even when that is behind the camera. A crop's depths can therefore
  differ from the same pixels of the full image. A sample is inside the box
  by the released test on its float32 position, with the released rounding of
  depths and positions (:mod:`vf3d_jax.rendering.volume`): with jitter 0 some
  rays that leave through a face lose their last sample (and so their last
  interval) to a rounding step.
* ``"clean"``: every ray is rendered on its own, with no per-view quantity, so
  crops, chunks and shards never change a pixel. Samples start at
  ``max(t_near, 0)`` and a ray hits only if the box is (partly) in front of the
  camera; a missed ray samples ``[0, 0]``; each depth is clamped to the ray's
  own ``[start, end]``, so an empty ray reads its box exit and a missed ray 0.
  Samples on the box surface count as inside. For cameras outside the box,
  colours and opacities are those of the compatible mode except on the rays
  whose first or last sample the compatible mode rounds out of the box.

* ``"fast"``: the clean mode's rays (start, hit and depth clamp per ray),
  sampled only where the field can have density. An occupancy grid
  (:func:`occupancy_grid`: ``occupancy_resolution^3`` cells, a cell occupied
  where the density exceeds ``occupancy_threshold`` at any of its lattice
  points (``occupancy_subdivision`` 2: its 27 corner, edge, face and centre
  points; 1: its 8 corners), dilated by ``occupancy_dilation`` cells) is
  built once per object; each ray probes it at ``num_probes`` points and lays
  its ``num_coarse`` stratified and ``num_fine`` importance samples in the
  occupied spans only (:func:`vf3d_jax.rendering.volume.occupied_depths`),
  compositing over the occupied length. With ``proposal`` the coarse pass
  reads the trilinear interpolation of the grid's raw density lattice
  (:class:`Occupancy`, from :func:`occupancy_field`) instead of the decoder:
  its ``num_coarse`` lookups only place the ``num_fine`` decoder samples,
  which alone are composited (the proposal sampling of mip-NeRF 360, with the
  lattice as the proposal). Samples behind the point where the
  transmittance falls below ``termination`` stop contributing, and no fine
  sample is floored there. Rays are sorted so that those that meet an
  occupied cell come first and whole chunks of rays that meet none are
  skipped (``lax.cond`` in the chunk loop; under ``vmap`` the skip becomes a
  select and only the smaller sample budget saves work, and inside
  ``shard_map`` JAX rejects that select, so map objects with ``lax.map`` as the
  trainer does). Shapes stay static
  and the mode is differentiable (the grid is not: it is a function of
  ``stop_gradient`` of the field).

All modes composite missed rays with opacity 0 (all their samples are
outside the box) and colour ``background``.

Randomness is an input. ``noise=RenderNoise(jitter, uniforms)`` gives the
arrays; ``key=`` draws them per ray from ``fold_in(fold_in(key, view),
pixel)`` inside the chunk that uses them (so memory does not grow with the
number of views, and a crop, a chunking or a sharding draws the same numbers
as the full render); neither gives the deterministic mode (jitter 0, uniforms
``linspace(0, 1, num_fine)``). :func:`draw_noise` materialises the key's
numbers.

Functions here are not jitted themselves: jit them with ``options``,
``resolution`` and ``crop`` static.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from vf3d_jax.models import triplane
from vf3d_jax.rendering import cameras
from vf3d_jax.rendering import volume

MODES = ("compatible", "clean", "fast")


@dataclasses.dataclass(frozen=True)
class RenderOptions:
  """How to render; hashable, so it can be a static jit argument."""

  num_coarse: int = 64  # stratified samples a ray
  num_fine: int = 64  # importance samples a ray (0: composite the coarse ones)
  mode: str = "compatible"  # "compatible" (released quirks) or "clean"
  box_size: float = 2.0  # side of the cube [-box/2, box/2]^3 the planes span
  background: tuple = (1.0, 1.0, 1.0)  # colour composited behind the object
  chunk_size: int = 8192  # rays evaluated together; bounds memory
  mlp_dtype: str = "float32"  # compute dtype of the decoder's matmuls
  planes_dtype: Optional[str] = None  # sample planes in this dtype; None: as given
  remat: bool = False  # recompute each chunk in the backward pass
  plane_gather: str = "per_plane"  # triplane.sample_triplane's gather: per_plane or one
  # The fast mode's empty-space skipping and early termination (other modes ignore these).
  occupancy_resolution: int = 64  # cells a side of the occupancy grid
  occupancy_threshold: float = 0.01  # activated density above which a cell is occupied
  occupancy_dilation: int = 1  # cells the occupied region grows by
  occupancy_subdivision: int = 2  # density queries a cell side: (s * G + 1)^3 in all
  num_probes: int = 0  # occupancy probes a ray; 0: 2 * occupancy_resolution
  termination: float = 1e-3  # transmittance below which samples stop contributing
  # The fast mode's coarse pass reads the grid's density lattice (trilinear) instead of the
  # decoder: num_coarse cheap lookups place the num_fine decoder samples, the only ones composited.
  proposal: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if (self.occupancy_resolution < 1 or self.occupancy_dilation < 0 or self.num_probes < 0
        or self.occupancy_subdivision < 1):
      raise ValueError("need occupancy_resolution >= 1, occupancy_subdivision >= 1, "
                       "occupancy_dilation >= 0 and num_probes >= 0")
    if self.proposal and self.num_fine < 2:
      raise ValueError("the proposal pass needs num_fine >= 2 (the composited samples)")
    if self.occupancy_threshold < 0 or not 0 <= self.termination < 1:
      raise ValueError("need occupancy_threshold >= 0 and termination in [0, 1)")
    if self.num_coarse < 2 or (self.num_fine > 0 and self.num_coarse < 4):
      raise ValueError("need num_coarse >= 2, and >= 4 with importance samples")
    if self.plane_gather not in ("per_plane", "one"):
      raise ValueError(f"plane_gather must be 'per_plane' or 'one', got {self.plane_gather!r}")
    if self.chunk_size < 1:
      raise ValueError("chunk_size must be positive")
    background = tuple(float(c) for c in self.background)
    if len(background) != 3:
      raise ValueError("background must be an RGB triple")
    object.__setattr__(self, "background", background)


  @property
  def probes(self) -> int:
    """Occupancy probes a ray in the fast mode."""
    return self.num_probes or 2 * self.occupancy_resolution


class RenderNoise(NamedTuple):
  """The random numbers of a render."""

  jitter: jax.Array  # [..., num_coarse] in [0, 1): stratified jitter per sample
  uniforms: jax.Array  # [..., num_fine] in [0, 1]: inverse-CDF inputs


def deterministic_noise(batch_shape: Sequence[int],
                        options: RenderOptions) -> RenderNoise:
  """Jitter 0 and uniforms ``linspace(0, 1, num_fine)``, ``[*batch_shape, n]``."""
  batch_shape = tuple(batch_shape)
  return RenderNoise(
      jnp.zeros(batch_shape + (options.num_coarse,), jnp.float32),
      jnp.broadcast_to(jnp.linspace(0.0, 1.0, options.num_fine, dtype=jnp.float32),
                       batch_shape + (options.num_fine,)))


def _ray_noise(key: jax.Array, view_id: jax.Array, pixel_id: jax.Array,
               options: RenderOptions) -> RenderNoise:
  """One ray's noise: ``([num_coarse], [num_fine])``."""
  ray_key = jax.random.fold_in(jax.random.fold_in(key, view_id), pixel_id)
  key_jitter, key_uniforms = jax.random.split(ray_key)
  return RenderNoise(
      jax.random.uniform(key_jitter, (options.num_coarse,), jnp.float32),
      jax.random.uniform(key_uniforms, (options.num_fine,), jnp.float32))


def draw_noise(key: jax.Array, view_ids: jax.Array, pixel_ids: jax.Array,
               options: RenderOptions) -> RenderNoise:
  """The noise a render with ``key=key`` uses for the given rays.

  Args:
    key: a PRNG key.
    view_ids: ``[...]`` int32 view index of each ray (0 for :func:`render_rays`).
    pixel_ids: ``[...]`` int32 ray index: row-major pixel index in the *full*
      image for :func:`render_views`, the position for :func:`render_rays`.
    options: sample counts.

  Returns:
    ``RenderNoise([..., num_coarse], [..., num_fine])``.
  """
  view_ids = jnp.asarray(view_ids, jnp.int32)
  pixel_ids = jnp.broadcast_to(jnp.asarray(pixel_ids, jnp.int32), view_ids.shape)
  draw = lambda v, p: _ray_noise(key, v, p, options)
  flat = jax.vmap(draw)(view_ids.reshape(-1), pixel_ids.reshape(-1))
  return jax.tree.map(lambda x: x.reshape(view_ids.shape + x.shape[-1:]), flat)


def crop_pixel_ids(resolution: int, crop=None) -> jax.Array:
  """``[S * S]`` row-major indices in the full image of a crop's pixels."""
  start_x, start_y, size = (0, 0, resolution) if crop is None else crop
  rows = jnp.arange(size, dtype=jnp.int32) + start_y
  cols = jnp.arange(size, dtype=jnp.int32) + start_x
  return (rows[:, None] * resolution + cols[None, :]).reshape(-1)


def view_noise(key: jax.Array, num_views: int, resolution: int, crop=None,
               options: RenderOptions = RenderOptions()) -> RenderNoise:
  """``RenderNoise([V, S*S, num_coarse], [V, S*S, num_fine])`` that
  ``render_views(..., key=key)`` uses."""
  pixel_ids = crop_pixel_ids(resolution, crop)
  view_ids = jnp.broadcast_to(jnp.arange(num_views, dtype=jnp.int32)[:, None],
                              (num_views, pixel_ids.shape[0]))
  return draw_noise(key, view_ids, pixel_ids[None], options)


def query_samples(decoder_params: Mapping, planes: jax.Array, points: jax.Array,
                  options: RenderOptions):
  """Raw density and colour of the field at points (the hot loop).

  Args:
    decoder_params: ``{"net_0": {"kernel", "bias"}, ...}``.
    planes: ``[3, H, W, C]``.
    points: ``[..., 3]``.
    options: box size and dtypes.

  Returns:
    ``(raw_density [...], rgb [..., 3])`` float32.
  """
  features = triplane.sample_triplane(planes, points, options.box_size, options.plane_gather)
  return triplane.decode_features(decoder_params, features,
                                  dtype=jnp.dtype(options.mlp_dtype))


def _noise_of(ray, key, options: RenderOptions) -> RenderNoise:
  """One ray's noise: from the key, from the ray's arrays, or deterministic."""
  if key is not None:
    return _ray_noise(key, ray["view_id"], ray["pixel_id"], options)
  if "jitter" in ray:
    return RenderNoise(ray["jitter"], ray["uniforms"])
  return deterministic_noise((), options)


def _render_ray(decoder_params, planes, ray, key, options: RenderOptions):
  """Renders one ray whose start/end are known; no background, no clamp.

  Args:
    ray: dict of one ray's ``origin [3], direction [3], start, end, t_near,
      t_far, hit, view_id, pixel_id`` and, unless ``key`` is given or the mode
      is deterministic, ``jitter [num_coarse], uniforms [num_fine]``.
    key: PRNG key or None.

  Returns:
    dict ``rgb [3], opacity, depth`` (inf when empty), ``depth_min, depth_max``
    (of all samples).
  """
  noise = _noise_of(ray, key, options)
  compatible = options.mode == "compatible"

  def evaluate(depths):
    points = volume.sample_points(ray["origin"], ray["direction"], depths,
                                  as_released=compatible)
    raw, rgb = query_samples(decoder_params, planes, points, options)
    if compatible:
      inside = volume.inside_box_points(points, options.box_size)
    else:
      inside = volume.inside_box(depths, ray["t_near"], ray["t_far"], ray["hit"])
    rgb, raw = volume.mask_outside(rgb, raw, inside)
    return rgb, raw

  depths = volume.stratified_depths(ray["start"], ray["end"], noise.jitter,
                                    as_released=compatible)
  rgb, raw = evaluate(depths)
  if options.num_fine > 0:
    weights, _, _, _ = volume.composite(rgb, raw, depths)
    fine_depths = volume.importance_depths(depths, weights, noise.uniforms)
    fine_rgb, fine_raw = evaluate(fine_depths)
    depths, rgb, raw = volume.merge_samples(depths, rgb, raw,
                                            fine_depths, fine_rgb, fine_raw)
  _, rgb_out, opacity, depth = volume.composite(rgb, raw, depths)
  return {"rgb": rgb_out, "opacity": opacity, "depth": depth,
          "depth_min": jnp.min(depths), "depth_max": jnp.max(depths)}


class Occupancy(NamedTuple):
  """The fast mode's view of one field: where it may have density, and how much."""

  occupied: jax.Array  # [G, G, G] bool, indexed [x, y, z]
  raw: Optional[jax.Array] = None  # [sG + 1]^3 raw density lattice (the proposal pass reads it)


def _as_occupancy(occupancy, decoder_params, planes, options: RenderOptions) -> Occupancy:
  """The fast mode's :class:`Occupancy`: built from the field when None, wrapped when a grid."""
  if occupancy is None:
    return occupancy_field(decoder_params, planes, options)
  if not isinstance(occupancy, Occupancy):
    occupancy = Occupancy(occupancy)
  if options.proposal and occupancy.raw is None:
    raise ValueError("RenderOptions.proposal needs the density lattice: pass "
                     "occupancy_field(...), not occupancy_grid(...)")
  return occupancy


def occupancy_grid(decoder_params: Mapping, planes: jax.Array,
                   options: RenderOptions = RenderOptions()) -> jax.Array:
  """The fast mode's occupancy grid of one field: ``occupancy_field(...).occupied``."""
  return occupancy_field(decoder_params, planes, options).occupied


def occupancy_field(decoder_params: Mapping, planes: jax.Array,
                    options: RenderOptions = RenderOptions()) -> Occupancy:
  """The fast mode's occupancy grid of one field and its density lattice (not differentiated).

  The activated density is queried on the ``(s G + 1)^3`` lattice that
  splits each cell side into ``s`` (``G = options.occupancy_resolution``, ``s
  = options.occupancy_subdivision``; 2: the corners, edge and face midpoints
  and centres of the cells, 1: their corners), one x-slab at a time; a cell is
  occupied where any of its ``(s + 1)^3`` points exceeds
  ``options.occupancy_threshold``, and the occupied set is dilated by
  ``options.occupancy_dilation`` cells.

  Args:
    decoder_params: ``{"net_0": {"kernel", "bias"}, ...}``.
    planes: ``[3, H, W, C]``.
    options: grid size, threshold, dilation, box size and dtypes.

  Returns:
    :class:`Occupancy`: ``occupied [G, G, G]`` bool, indexed ``[x, y, z]``
    (:func:`vf3d_jax.rendering.volume.grid_cells`), and the raw densities of
    the lattice, ``[sG + 1]^3``.
  """
  decoder_params = lax.stop_gradient(decoder_params)
  planes = lax.stop_gradient(planes)
  if options.planes_dtype is not None:
    planes = planes.astype(options.planes_dtype)
  sub = options.occupancy_subdivision
  size = sub * options.occupancy_resolution + 1
  axis = jnp.linspace(-options.box_size / 2, options.box_size / 2, size, dtype=jnp.float32)
  yy, zz = jnp.meshgrid(axis, axis, indexing="ij")

  def slab(x):
    points = jnp.stack([jnp.full_like(yy, x), yy, zz], axis=-1)
    raw, _ = query_samples(decoder_params, planes, points, options)
    return raw

  raw = lax.map(slab, axis)  # [sG + 1] * 3
  density = triplane.density_activation(raw)
  cells = lax.reduce_window(density, -jnp.inf, lax.max, (sub + 1,) * 3, (sub,) * 3, "VALID")
  occupied = cells > options.occupancy_threshold
  if options.occupancy_dilation:
    width = 2 * options.occupancy_dilation + 1
    occupied = lax.reduce_window(occupied.astype(jnp.float32), 0.0, lax.max, (width,) * 3,
                                 (1, 1, 1), "SAME") > 0
  return Occupancy(occupied, raw)


def _render_ray_fast(decoder_params, planes, occupancy, ray, key, options: RenderOptions):
  """Renders one ray in the fast mode (samples in its occupied spans only).

  Args:
    occupancy: :class:`Occupancy`.
    ray, key: as :func:`_render_ray`; the ray also holds ``occupied [P]``,
      its probes of the grid (:func:`_probe_rays`).

  Returns:
    dict ``rgb [3], opacity, depth`` (inf when empty; not clamped).
  """
  noise = _noise_of(ray, key, options)
  origin, direction, start, end = ray["origin"], ray["direction"], ray["start"], ray["end"]
  occupied = ray["occupied"]
  length = volume.occupied_length(occupied, start, end)

  def evaluate(s):
    depths = volume.occupied_depths(s, occupied, start, end)
    points = volume.sample_points(origin, direction, depths)
    raw, rgb = query_samples(decoder_params, planes, points, options)
    return depths, rgb, raw

  s = jnp.clip(volume.stratified_depths(jnp.zeros_like(length), length, noise.jitter), 0.0,
               length)
  if options.proposal:
    # The coarse pass on the lattice: weights only, no decoder, nothing composited.
    points = volume.sample_points(origin, direction, volume.occupied_depths(s, occupied, start,
                                                                            end))
    raw = volume.lattice_lookup(occupancy.raw, points, options.box_size)
    weights, _, _, _ = volume.composite(jnp.zeros(raw.shape + (3,), raw.dtype), raw, s)
    alive = None
    if options.termination > 0:
      alive = volume.alive_intervals(weights, options.termination)
    s = jnp.sort(jnp.clip(volume.importance_depths(s, weights, noise.uniforms, floor_mask=alive),
                          0.0, length))
  depths, rgb, raw = evaluate(s)
  if options.num_fine > 0 and not options.proposal:
    weights, _, _, _ = volume.composite(rgb, raw, s)
    alive = None  # termination 0: every interval floored, as the clean mode
    if options.termination > 0:
      alive = volume.alive_intervals(lax.stop_gradient(weights), options.termination)
    fine_s = jnp.clip(volume.importance_depths(s, weights, noise.uniforms, floor_mask=alive),
                      0.0, length)
    _, fine_rgb, fine_raw = evaluate(fine_s)
    s, rgb, raw = volume.merge_samples(s, rgb, raw, fine_s, fine_rgb, fine_raw)
    depths = volume.occupied_depths(s, occupied, start, end)
  _, rgb_out, opacity, depth = volume.composite_spans(rgb, raw, s, depths, options.termination)
  return {"rgb": rgb_out, "opacity": opacity, "depth": depth}


def _probe_rays(occupancy: Occupancy, per_ray, chunk: int, options: RenderOptions):
  """``[N, P]`` bool: every ray's probes of the grid, ``chunk`` rays at a time."""
  probe = lambda ray: volume.probe_occupancy(ray["origin"], ray["direction"], ray["start"],
                                             ray["end"], occupancy.occupied, options.probes,
                                             options.box_size)
  return lax.map(probe, per_ray, batch_size=chunk)


def _render_compacted(render_one, per_ray, active, chunk: int):
  """``render_one`` over the active rays only, in whole chunks; the rest are empty.

  Active rays are sorted first (a stable sort of ``~active``), the rays are
  cut into chunks of ``chunk``, and a chunk with no active ray returns the
  empty ray (opacity 0, colour 0, depth inf) without rendering.
  """
  num_rays = active.shape[0]
  order = jnp.argsort(~active, stable=True)
  inverse = jnp.argsort(order)
  pad = -num_rays % chunk

  def cut(x):
    x = jnp.concatenate([x[order], jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return x.reshape((-1, chunk) + x.shape[1:])

  chunks = jax.tree.map(cut, per_ray)
  live = cut(active)

  def one_chunk(args):
    rays, alive = args
    # Built from the rays so that, under shard_map, both branches vary over the rays' axis.
    empty = lambda rays: {"rgb": jnp.zeros_like(rays["origin"]),
                          "opacity": jnp.zeros_like(rays["start"]),
                          "depth": jnp.full_like(rays["start"], jnp.inf)}
    return lax.cond(jnp.any(alive), jax.vmap(render_one), empty, rays)

  out = lax.map(one_chunk, (chunks, live))
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num_rays][inverse], out)


def _segment_reduce(values, view_ids, num_views, reduce, axis_name):
  """Per-view min or max of per-ray values, across devices if sharded.

  Args:
    values: ``[N]`` float32.
    view_ids: ``[N]`` int32 in ``[0, num_views)``.
    reduce: ``"min"`` or ``"max"``; empty views give ``+inf`` / ``-inf``.

  Returns:
    ``[num_views]``.
  """
  if reduce == "min":
    out = jax.ops.segment_min(values, view_ids, num_segments=num_views)
    return lax.pmin(out, axis_name) if axis_name is not None else out
  out = jax.ops.segment_max(values, view_ids, num_segments=num_views)
  return lax.pmax(out, axis_name) if axis_name is not None else out


def _render_flat_rays(decoder_params, planes, rays, key, num_views: int,
                      options: RenderOptions, axis_name=None, occupancy=None):
  """Renders rays of several views, laid out flat.

  Args:
    rays: dict of ``origin [N, 3], direction [N, 3], view_id [N], pixel_id [N],
      real [N] bool`` (false for padding) and optionally ``jitter [N,
      num_coarse], uniforms [N, num_fine]``.
    key: PRNG key or None.
    num_views: number of views the ``view_id`` index.
    axis_name: mesh axis the rays are split over (inside ``shard_map``).
    occupancy: the fast mode's ``[G, G, G]`` grid; None: built here.

  Returns:
    dict ``rgb [N, 3], depth [N], opacity [N]``.
  """
  fast = options.mode == "fast"
  clean = options.mode in ("clean", "fast")
  if fast:
    occupancy = _as_occupancy(occupancy, decoder_params, planes, options)
  if options.planes_dtype is not None:
    planes = planes.astype(options.planes_dtype)
  real = rays["real"]
  view_ids = rays["view_id"]
  reduce = functools.partial(_segment_reduce, view_ids=view_ids,
                             num_views=num_views, axis_name=axis_name)

  origins = lax.stop_gradient(rays["origin"])
  directions = lax.stop_gradient(rays["direction"])
  t_near, t_far, hit = volume.intersect_box(origins, directions, options.box_size)
  hit = hit & real
  if clean:
    hit = hit & (t_far > 0)
    start = jnp.where(hit, jnp.maximum(t_near, 0.0), 0.0)
    end = jnp.where(hit, t_far, 0.0)
  else:
    # Missed rays sample between the smallest and the largest *start* of the
    # view's hitting rays (the released quirk), or [-1, -2].
    first = reduce(jnp.where(hit, t_near, jnp.inf), reduce="min")
    last = reduce(jnp.where(hit, t_near, -jnp.inf), reduce="max")
    any_hit = first < jnp.inf
    start = jnp.where(hit, t_near, jnp.where(any_hit, first, -1.0)[view_ids])
    end = jnp.where(hit, t_far, jnp.where(any_hit, last, -2.0)[view_ids])

  per_ray = dict(rays, origin=origins, direction=directions, start=start,
                 end=end, t_near=t_near, t_far=t_far, hit=hit)
  del per_ray["real"]
  if fast:
    render_one = lambda ray: _render_ray_fast(decoder_params, planes, occupancy, ray, key,
                                              options)
  else:
    render_one = lambda ray: _render_ray(decoder_params, planes, ray, key, options)
  if options.remat:
    render_one = jax.checkpoint(render_one)
  # Whole chunks only (the padding rays miss the box and are dropped), so the
  # chunk is compiled once.
  num_rays = origins.shape[0]
  chunk = min(options.chunk_size, num_rays)
  pad = -num_rays % chunk
  if fast:
    # Probed once: the probes say which rays to render and where their samples go.
    per_ray["occupied"] = _probe_rays(occupancy, per_ray, chunk, options)
    active = jnp.any(per_ray["occupied"], axis=-1)
    out = _render_compacted(render_one, per_ray, active, chunk)
  else:
    per_ray = jax.tree.map(
        lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]),
        per_ray)
    out = lax.map(render_one, per_ray, batch_size=chunk)
    out = jax.tree.map(lambda x: x[:num_rays], out)

  if clean:
    depth = jnp.clip(out["depth"], start, end)
  else:
    low = reduce(jnp.where(real, out["depth_min"], jnp.inf), reduce="min")
    high = reduce(jnp.where(real, out["depth_max"], -jnp.inf), reduce="max")
    depth = jnp.clip(out["depth"], low[view_ids], high[view_ids])
  background = jnp.asarray(options.background, jnp.float32)
  rgb = out["rgb"] + background * (1.0 - out["opacity"])[:, None]
  return {"rgb": rgb, "depth": depth, "opacity": out["opacity"]}


def render_rays(decoder_params: Mapping, planes: jax.Array, origins: jax.Array,
                directions: jax.Array, noise: Optional[RenderNoise] = None, *,
                key: Optional[jax.Array] = None,
                options: RenderOptions = RenderOptions(),
                occupancy: Optional[jax.Array] = None):
  """Renders arbitrary rays of one triplane as one view.

  The per-view quantities (miss-ray range, depth clamp) are computed over all
  ``R`` rays of the call.

  Args:
    decoder_params: ``{"net_0": {"kernel", "bias"}, ...}``.
    planes: ``[3, H, W, C]``.
    origins: ``[R, 3]`` float32.
    directions: ``[R, 3]`` float32 unit directions.
    noise: ``RenderNoise([R, num_coarse], [R, num_fine])``, or None.
    key: PRNG key to draw the noise from (ray ``i`` uses view 0, pixel ``i``);
      with neither, deterministic.
    options: :class:`RenderOptions`.
    occupancy: the fast mode's grid (:func:`occupancy_grid`); None: built in
      the call.

  Returns:
    dict ``rgb [R, 3]`` (on the background), ``depth [R]``, ``opacity [R]``.
  """
  if noise is not None and key is not None:
    raise ValueError("give noise or key, not both")
  num_rays = origins.shape[0]
  rays = {"origin": origins.astype(jnp.float32),
          "direction": directions.astype(jnp.float32),
          "view_id": jnp.zeros((num_rays,), jnp.int32),
          "pixel_id": jnp.arange(num_rays, dtype=jnp.int32),
          "real": jnp.ones((num_rays,), bool)}
  if noise is not None:
    rays.update(jitter=noise.jitter, uniforms=noise.uniforms)
  return _render_flat_rays(decoder_params, planes, rays, key, 1, options,
                           occupancy=occupancy)


def _view_rays(c2w, intrinsics, resolution, crop, noise):
  """Flat rays of ``V`` views: dict of ``[V * S * S, ...]`` arrays."""
  origins, directions = jax.vmap(
      lambda c, k: cameras.generate_rays(c, k, resolution, crop))(
          c2w.astype(jnp.float32), intrinsics.astype(jnp.float32))
  num_views, num_pixels = origins.shape[:2]
  pixel_ids = crop_pixel_ids(resolution, crop)
  rays = {"origin": origins.reshape(-1, 3),
          "direction": directions.reshape(-1, 3),
          "view_id": jnp.repeat(jnp.arange(num_views, dtype=jnp.int32), num_pixels),
          "pixel_id": jnp.tile(pixel_ids, num_views),
          "real": jnp.ones((num_views * num_pixels,), bool)}
  if noise is not None:
    rays.update(jitter=noise.jitter.reshape(-1, noise.jitter.shape[-1]),
                uniforms=noise.uniforms.reshape(-1, noise.uniforms.shape[-1]))
  return rays


def _to_images(flat, num_views, size):
  return {"rgb": flat["rgb"].reshape(num_views, size, size, 3),
          "depth": flat["depth"].reshape(num_views, size, size),
          "opacity": flat["opacity"].reshape(num_views, size, size)}


def render_views(decoder_params: Mapping, planes: jax.Array, c2w: jax.Array,
                 intrinsics: jax.Array, resolution: int, crop=None, *,
                 noise: Optional[RenderNoise] = None,
                 key: Optional[jax.Array] = None,
                 options: RenderOptions = RenderOptions(),
                 occupancy: Optional[jax.Array] = None):
  """Renders square views (or the same crop of each) of one triplane.

  All views' rays are rendered in chunks of ``options.chunk_size``; the
  per-view quantities are computed per view.

  Args:
    decoder_params: ``{"net_0": {"kernel", "bias"}, ...}``.
    planes: ``[3, H, W, C]``.
    c2w: ``[V, 4, 4]`` OpenGL camera-to-world.
    intrinsics: ``[V, 4]`` normalised ``(fx, fy, cx, cy)``.
    resolution: side ``R`` of the full image (static).
    crop: optional static ``(start_x, start_y, size)``; ``S = size`` (else R).
    noise: ``RenderNoise([V, S*S, num_coarse], [V, S*S, num_fine])`` or None.
    key: PRNG key (see :func:`view_noise`); with neither, deterministic.
    options: :class:`RenderOptions` (static).
    occupancy: the fast mode's grid (:func:`occupancy_grid`; build it once
      for many calls); None: built in the call.

  Returns:
    dict ``rgb [V, S, S, 3], depth [V, S, S], opacity [V, S, S]`` float32.
  """
  if noise is not None and key is not None:
    raise ValueError("give noise or key, not both")
  num_views = c2w.shape[0]
  size = resolution if crop is None else crop[2]
  rays = _view_rays(c2w, intrinsics, resolution, crop, noise)
  flat = _render_flat_rays(decoder_params, planes, rays, key, num_views, options,
                           occupancy=occupancy)
  return _to_images(flat, num_views, size)


def count_work(decoder_params: Mapping, planes: jax.Array, c2w: jax.Array,
               intrinsics: jax.Array, resolution: int, options: RenderOptions = RenderOptions(),
               occupancy: Optional[jax.Array] = None) -> dict[str, float]:
  """What one :func:`render_views` call of these views evaluates (not jitted; for benchmarks).

  Counts follow the chunk loop: every chunk runs ``chunk * (num_coarse +
  num_fine)`` decoder evaluations, each of which reads the three planes (one
  bilinear lookup of 4 texels a plane). The compatible and clean modes run every
  chunk; the fast mode only the chunks holding a ray that meets an occupied
  cell (rays sorted first), and probes its grid ``probes`` times a ray; its grid
  costs ``(s G + 1)^3`` evaluations once per object.

  Returns:
    dict: ``rays``, ``rays_in_box``, ``chunks``, ``chunks_run``,
    ``mlp_evaluations``, ``plane_lookups`` (per call) and, in the fast mode,
    ``active_rays``, ``occupancy_probes``, ``grid_evaluations`` (per object),
    ``occupied_fraction`` (of the grid's cells) and ``occupied_length_fraction``
    (of the in-box span of the rays in the box).
  """
  rays = _view_rays(c2w, intrinsics, resolution, None, None)
  num_rays = rays["origin"].shape[0]
  t_near, t_far, hit = volume.intersect_box(rays["origin"], rays["direction"], options.box_size)
  hit = hit & (t_far > 0)
  chunk = min(options.chunk_size, num_rays)
  chunks = -(-num_rays // chunk)
  out = {"rays": num_rays, "rays_in_box": int(jnp.sum(hit)), "chunks": chunks}
  chunks_run = chunks
  if options.mode == "fast":
    occupancy = _as_occupancy(occupancy, decoder_params, planes, options)
    start = jnp.where(hit, jnp.maximum(t_near, 0.0), 0.0)
    end = jnp.where(hit, t_far, 0.0)
    occupied = jax.jit(jax.vmap(functools.partial(
        volume.probe_occupancy, grid=occupancy.occupied, num_probes=options.probes,
        box_size=options.box_size)))(rays["origin"], rays["direction"], start, end)
    active = int(jnp.sum(jnp.any(occupied, axis=-1)))
    chunks_run = -(-active // chunk)
    span = jnp.sum(jnp.where(hit, end - start, 0.0))
    length = jnp.sum(volume.occupied_length(occupied, start, end))
    out.update(active_rays=active, occupancy_probes=num_rays * options.probes,
               grid_evaluations=(options.occupancy_subdivision * options.occupancy_resolution
                                 + 1) ** 3,
               occupied_fraction=float(jnp.mean(occupancy.occupied)),
               occupied_length_fraction=float(length / jnp.maximum(span, 1e-12)))
  decoded = options.num_coarse + options.num_fine
  if options.mode == "fast" and options.proposal:
    decoded = options.num_fine
    out["lattice_lookups"] = chunks_run * chunk * options.num_coarse
  evaluations = chunks_run * chunk * decoded
  out.update(chunks_run=chunks_run, mlp_evaluations=evaluations, plane_lookups=3 * evaluations)
  return out


def render_views_sharded(decoder_params: Mapping, planes: jax.Array,
                         c2w: jax.Array, intrinsics: jax.Array, resolution: int,
                         mesh: Mesh, axis_name: str = "data", crop=None, *,
                         noise: Optional[RenderNoise] = None,
                         key: Optional[jax.Array] = None,
                         options: RenderOptions = RenderOptions(),
                         occupancy: Optional[jax.Array] = None):
  """:func:`render_views` with the rays split across a mesh axis.

  Rays (of all views, flat) are padded to a multiple of the axis size and
  split over ``axis_name``; planes and decoder are replicated. The per-view
  reductions run across devices (``pmin``/``pmax``) so the result equals the
  unsharded render. Build ``mesh`` with ``jax.sharding.Mesh`` (or
  ``AxisType.Auto`` axes).

  Args:
    as :func:`render_views`, plus ``mesh`` and ``axis_name`` (static).

  Returns:
    dict ``rgb [V, S, S, 3], depth [V, S, S], opacity [V, S, S]``.
  """
  if noise is not None and key is not None:
    raise ValueError("give noise or key, not both")
  num_views = c2w.shape[0]
  size = resolution if crop is None else crop[2]
  rays = _view_rays(c2w, intrinsics, resolution, crop, noise)
  num_rays = rays["origin"].shape[0]
  num_shards = mesh.shape[axis_name]
  pad = -num_rays % num_shards

  def pad_rays(name, x):
    if not pad:
      return x
    # Padding rays are marked unreal: they hit nothing and join no reduction.
    fill = {"view_id": num_views - 1, "real": False}.get(name, 0)
    return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])

  rays = {name: pad_rays(name, x) for name, x in rays.items()}
  rays_spec = {name: PartitionSpec(axis_name) for name in rays}
  if options.mode == "fast":  # once, replicated
    occupancy = _as_occupancy(occupancy, decoder_params, planes, options)
  render = functools.partial(_render_flat_rays, num_views=num_views,
                             options=options, axis_name=axis_name)
  if key is None:
    sharded = jax.shard_map(
        lambda params, planes, rays, grid: render(params, planes, rays, None, occupancy=grid),
        mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(), rays_spec, PartitionSpec()),
        out_specs=PartitionSpec(axis_name))
    flat = sharded(decoder_params, planes, rays, occupancy)
  else:
    sharded = jax.shard_map(
        lambda params, planes, rays, key, grid: render(params, planes, rays, key,
                                                       occupancy=grid),
        mesh=mesh,
        in_specs=(PartitionSpec(),) * 2 + (rays_spec,) + (PartitionSpec(),) * 2,
        out_specs=PartitionSpec(axis_name))
    flat = sharded(decoder_params, planes, rays, key, occupancy)
  flat = jax.tree.map(lambda x: x[:num_rays], flat)
  return _to_images(flat, num_views, size)
