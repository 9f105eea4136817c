"""Volume rendering maths of the released renderer, as pure array functions.

The released model renders with EG3D's importance renderer as modified by
OpenLRM: box-bounded stratified samples, samples outside the box masked out,
a "MipRayMarcher2" that averages colours, raw densities and depths at interval
midpoints, and NeRF-style inverse-CDF resampling of smoothed coarse weights.
Every function here works on one ray or on any batch of rays: the sample axis is
last (``[..., S]``; colours ``[..., S, 3]``).

The compatible mode keeps the released float32 arithmetic where rounding
decides an outcome. With jitter 0 the first and last stratified samples lie on
the box surface by construction; the released renderer computes the last depth
as ``start + 1 * (end - start)``, the positions as ``origin + depth *
direction`` and tests those positions (inclusive) against the box, so whether a
surface sample counts is decided by float32 rounding: on some of the rays that
leave the box through a face the last sample lands a rounding step outside and
drops out, and the last interval with it. :func:`stratified_depths` and
:func:`sample_points` with ``as_released=True`` and :func:`inside_box_points`
reproduce that; :func:`round_product` keeps XLA from fusing those products
into their sums (a fused multiply-add rounds once, PyTorch twice).

The clean mode decides in-box samples from their depth (``t_near <= t <=
t_far`` on a ray that hits, :func:`inside_box`) and puts the first and last
samples exactly on ``start`` and ``end`` (``start * (1 - s) + end * s``): on a
straight line through a convex box this is the inclusive position test
without the rounding, so samples on the surface count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax.models.triplane import density_activation

# Raw density given to samples outside the box: PyTorch's nan_to_num(-inf)
# (the most negative float32) divided by 3, so that the sum of two of them at a
# midpoint still does not overflow. softplus of it is exactly 0.
OUTSIDE_RAW_DENSITY = float(np.float32(np.finfo(np.float32).min) / np.float32(3))
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Keeps the transmittance product away from 0 (as released).
TRANSMITTANCE_EPS = 1e-10
# Added to the smoothed coarse weights before they become a pdf (as released).
WEIGHT_FLOOR = 0.01
PDF_EPS = 1e-5


def intersect_box(origins: jax.Array, directions: jax.Array,
                  box_size: float = 2.0):
  """Slab test of lines against the cube ``[-box_size/2, box_size/2]^3``.

  Args:
    origins: ``[..., 3]`` float32 ray origins.
    directions: ``[..., 3]`` float32 ray directions (any length).

  Returns:
    ``(t_near [...], t_far [...], hit [...] bool)``: the depths at which the
    line enters and leaves the box (either may be negative: the whole line is
    tested, as released) and ``hit = t_near < t_far``. Where ``hit`` is false
    ``t_near``/``t_far`` are meaningless.
  """
  half = box_size / 2
  inv = 1.0 / directions  # +-inf on axis-parallel rays is what the slabs need
  t_low = (-half - origins) * inv
  t_high = (half - origins) * inv
  t_near = jnp.max(jnp.minimum(t_low, t_high), axis=-1)
  t_far = jnp.min(jnp.maximum(t_low, t_high), axis=-1)
  return t_near, t_far, t_near < t_far


def round_product(product: jax.Array) -> jax.Array:
  """``product`` kept a float32 value of its own before it is summed.

  XLA contracts ``a + b * c`` into a fused multiply-add where it can (one
  rounding), PyTorch's eager kernels round the product and then the sum. A
  clamp to the finite float32 range between the two stops the contraction and
  changes no finite value, so ``a + round_product(b * c)`` rounds as released.

  Args:
    product: any float32 array.

  Returns:
    the same values (infinities clamped to the largest finite float).
  """
  return jnp.clip(product, -FLOAT32_MAX, FLOAT32_MAX)


def stratified_depths(start: jax.Array, end: jax.Array, jitter: jax.Array,
                      as_released: bool = False) -> jax.Array:
  """Evenly spaced depths from ``start`` to ``end``, each pushed by a jitter.

  ``t_k = start + k / (S - 1) * (end - start) + jitter_k * (end - start) / (S -
  1)``: the jitter is drawn per sample, so with it the last sample lies beyond
  ``end`` (as released).

  Args:
    start: ``[...]`` float32 first depth.
    end: ``[...]`` float32 last depth.
    jitter: ``[..., S]`` in ``[0, 1)``; zeros give the plain grid.
    as_released: round as the released ``math_utils.linspace`` does (each
      product, then each sum), so that the last depth is ``start + (end -
      start)``, which may differ from ``end`` by a rounding step. Otherwise the
      grid is ``start * (1 - s) + end * s``, exactly ``start`` and ``end`` at
      its ends. The jitter's step ``(end - start) / (S - 1)`` is computed as a
      multiplication by the reciprocal (XLA's rewrite), so jittered depths may
      differ from the released ones by a rounding step; the grid itself
      (jitter 0) is the released one bit for bit.

  Returns:
    ``[..., S]`` float32 depths.
  """
  num = jitter.shape[-1]
  # k / (S - 1) divided here: XLA would turn a division by a constant into a
  # multiplication by its (rounded) reciprocal.
  step = jnp.asarray(np.arange(num, dtype=np.float32) / np.float32(num - 1))
  start = start[..., None]
  end = end[..., None]
  span = end - start
  if as_released:
    grid = start + round_product(step * span)
    return grid + round_product(jitter * (span / (num - 1)))
  return start * (1.0 - step) + end * step + jitter * (span / (num - 1))


def sample_points(origin: jax.Array, direction: jax.Array, depths: jax.Array,
                  as_released: bool = False) -> jax.Array:
  """Points ``origin + depth * direction`` of the samples of rays.

  Args:
    origin: ``[..., 3]`` float32.
    direction: ``[..., 3]`` float32.
    depths: ``[..., S]`` float32.
    as_released: round each product before the sum (see
      :func:`round_product`), so the positions are the released float32 ones
      bit for bit.

  Returns:
    ``[..., S, 3]`` float32.
  """
  offsets = depths[..., None] * direction[..., None, :]
  if as_released:
    offsets = round_product(offsets)
  return origin[..., None, :] + offsets


def inside_box_points(points: jax.Array, box_size: float = 2.0) -> jax.Array:
  """``[..., S]`` bool: the released in-box test on sample positions.

  Inclusive: ``-box_size/2 <= p <= box_size/2`` on all three axes, on the
  float32 positions as they are (see :func:`sample_points`).

  Args:
    points: ``[..., S, 3]`` sample positions.
  """
  half = box_size / 2
  return jnp.all((points >= -half) & (points <= half), axis=-1)


def inside_box(depths: jax.Array, t_near: jax.Array, t_far: jax.Array,
               hit: jax.Array) -> jax.Array:
  """``[..., S]`` bool: samples at ``depths`` inside the box (inclusive).

  The clean mode's test: samples on the box surface by construction count.

  Args:
    depths: ``[..., S]`` sample depths.
    t_near, t_far, hit: ``[...]`` from :func:`intersect_box`.
  """
  return (hit[..., None] & (depths >= t_near[..., None])
          & (depths <= t_far[..., None]))


def mask_outside(rgb: jax.Array, raw_density: jax.Array, inside: jax.Array):
  """Outside samples get colour 0 and raw density :data:`OUTSIDE_RAW_DENSITY`.

  Args:
    rgb: ``[..., S, 3]``.
    raw_density: ``[..., S]``.
    inside: ``[..., S]`` bool.

  Returns:
    ``(rgb [..., S, 3], raw_density [..., S])``.
  """
  rgb = jnp.where(inside[..., None], rgb, 0.0)
  raw_density = jnp.where(inside, raw_density, OUTSIDE_RAW_DENSITY)
  return rgb, raw_density


def composite(rgb: jax.Array, raw_density: jax.Array, depths: jax.Array):
  """Alpha compositing over the ``S - 1`` intervals between samples.

  Colours, raw densities and depths are averaged at interval midpoints; the
  density is activated there (``softplus(raw - 1)``); ``alpha = 1 -
  exp(-sigma * delta)``; ``T = cumprod([1, 1 - alpha + 1e-10])[:-1]``;
  ``w = alpha * T``.

  Args:
    rgb: ``[..., S, 3]`` float32 sample colours.
    raw_density: ``[..., S]`` float32 raw densities.
    depths: ``[..., S]`` float32 sample depths (sorted, except in the released
      renderer's coarse pass of a view no ray of which hits the box).

  Returns:
    ``(weights [..., S-1], rgb [..., 3], opacity [...], depth [...])``: the
    colour is not yet composited on a background; ``depth = sum(w * t_mid) /
    opacity``, ``+inf`` where the opacity is 0 (the released NaN -> inf),
    not clamped.
  """
  deltas = depths[..., 1:] - depths[..., :-1]
  rgb_mid = (rgb[..., :-1, :] + rgb[..., 1:, :]) / 2
  raw_mid = (raw_density[..., :-1] + raw_density[..., 1:]) / 2
  depth_mid = (depths[..., :-1] + depths[..., 1:]) / 2
  alpha = 1.0 - jnp.exp(-density_activation(raw_mid) * deltas)
  transmittance = jnp.cumprod(
      jnp.concatenate([jnp.ones_like(alpha[..., :1]),
                       1.0 - alpha + TRANSMITTANCE_EPS], axis=-1), axis=-1)[..., :-1]
  weights = alpha * transmittance
  rgb_out = jnp.sum(weights[..., None] * rgb_mid, axis=-2)
  opacity = jnp.sum(weights, axis=-1)
  depth_sum = jnp.sum(weights * depth_mid, axis=-1)
  # Divide only where defined so that gradients stay finite.
  seen = opacity > 0
  depth = jnp.where(seen, depth_sum / jnp.where(seen, opacity, 1.0), jnp.inf)
  return weights, rgb_out, opacity, depth


def smooth_weights(weights: jax.Array) -> jax.Array:
  """Max-pool (kernel 2, stride 1, pad 1) then avg-pool (kernel 2, stride 1).

  Args:
    weights: ``[..., N]`` float32.

  Returns:
    ``[..., N]``: ``(max(w[i-1], w[i]) + max(w[i], w[i+1])) / 2`` with the
    missing neighbours at the ends ignored (PyTorch pads max-pool with -inf).
  """
  pad = jnp.full_like(weights[..., :1], -jnp.inf)
  padded = jnp.concatenate([pad, weights, pad], axis=-1)
  pooled = jnp.maximum(padded[..., :-1], padded[..., 1:])  # [..., N + 1]
  return (pooled[..., :-1] + pooled[..., 1:]) / 2


def sample_pdf(bins: jax.Array, weights: jax.Array,
               uniforms: jax.Array) -> jax.Array:
  """Inverse-CDF sampling of a piecewise-linear CDF over ``bins``.

  Args:
    bins: ``[..., B]`` sorted bin edges.
    weights: ``[..., B - 1]`` non-negative bin weights (``1e-5`` is added).
    uniforms: ``[..., F]`` in ``[0, 1]``.

  Returns:
    ``[..., F]`` samples. Where a bin's CDF step is below ``1e-5`` (only at the
    clamped ends) the step is taken as 1, as released.
  """
  num_bins = weights.shape[-1]
  weights = weights + PDF_EPS
  pdf = weights / jnp.sum(weights, axis=-1, keepdims=True)
  cdf = jnp.concatenate([jnp.zeros_like(pdf[..., :1]),
                         jnp.cumsum(pdf, axis=-1)], axis=-1)  # [..., B]
  # searchsorted(cdf, u, side="right") as a count: cdf is non-decreasing.
  index = jnp.sum(cdf[..., None, :] <= uniforms[..., :, None], axis=-1)
  below = jnp.maximum(index - 1, 0)
  above = jnp.minimum(index, num_bins)
  cdf_below = jnp.take_along_axis(cdf, below, axis=-1)
  cdf_above = jnp.take_along_axis(cdf, above, axis=-1)
  bins_below = jnp.take_along_axis(bins, below, axis=-1)
  bins_above = jnp.take_along_axis(bins, above, axis=-1)
  denom = cdf_above - cdf_below
  denom = jnp.where(denom < PDF_EPS, 1.0, denom)
  return bins_below + (uniforms - cdf_below) / denom * (bins_above - bins_below)


def importance_depths(depths: jax.Array, weights: jax.Array,
                      uniforms: jax.Array, floor_mask: jax.Array | None = None) -> jax.Array:
  """Fine sample depths from a coarse pass, without gradient.

  The coarse weights are smoothed (:func:`smooth_weights`) and floored by
  0.01; the bins are the ``S - 1`` coarse interval midpoints and the pdf uses
  the ``S - 3`` inner smoothed weights ``[1:-1]`` (as released, so the last
  midpoint is never reached).

  Args:
    depths: ``[..., S]`` coarse depths.
    weights: ``[..., S - 1]`` coarse compositing weights.
    uniforms: ``[..., F]`` in ``[0, 1]``.
    floor_mask: ``[..., S - 1]`` bool, the intervals that get the floor; None:
      all (as released). The fast mode floors only the intervals before the
      ray's termination, so that no fine sample is spent behind the surface.

  Returns:
    ``[..., F]`` float32 depths (unsorted).
  """
  depths = jax.lax.stop_gradient(depths)
  weights = jax.lax.stop_gradient(weights).astype(jnp.float32)
  floor = WEIGHT_FLOOR if floor_mask is None else jnp.where(floor_mask, WEIGHT_FLOOR, 0.0)
  smoothed = smooth_weights(weights) + floor
  bins = (depths[..., :-1] + depths[..., 1:]) / 2
  return jax.lax.stop_gradient(sample_pdf(bins, smoothed[..., 1:-1], uniforms))


def merge_samples(depths_a, rgb_a, raw_a, depths_b, rgb_b, raw_b):
  """Concatenates two sample sets and sorts them by depth.

  Args:
    depths_a: ``[..., S]``; rgb_a ``[..., S, 3]``; raw_a ``[..., S]``.
    depths_b: ``[..., F]``; rgb_b ``[..., F, 3]``; raw_b ``[..., F]``.

  Returns:
    ``(depths [..., S+F], rgb [..., S+F, 3], raw [..., S+F])`` sorted by depth.
  """
  depths = jnp.concatenate([depths_a, depths_b], axis=-1)
  rgb = jnp.concatenate([rgb_a, rgb_b], axis=-2)
  raw = jnp.concatenate([raw_a, raw_b], axis=-1)
  order = jnp.argsort(depths, axis=-1)
  return (jnp.take_along_axis(depths, order, axis=-1),
          jnp.take_along_axis(rgb, order[..., None], axis=-2),
          jnp.take_along_axis(raw, order, axis=-1))


# --- Empty-space skipping (the fast mode) -------------------------------------
#
# An occupancy grid ``[G, G, G]`` (bool, x-major) marks the cells of the box
# where the field may have density. Each ray probes it at ``P`` evenly spaced
# points of its box span ``[start, end]``; probe ``p`` stands for the segment
# ``[start + p h, start + (p + 1) h]``, ``h = (end - start) / P``. The occupied
# segments laid end to end give the ray's *occupied length* coordinate ``s`` in
# ``[0, L]``, ``L = h * (occupied probes)``; samples are placed in ``s`` and
# mapped back to depths by :func:`occupied_depths`, so that a fixed number of
# samples covers only the occupied spans, however short.


def grid_cells(points: jax.Array, resolution: int, box_size: float = 2.0) -> jax.Array:
  """``[..., 3]`` int32 indices of the occupancy-grid cells holding ``points``.

  Cells split ``[-box/2, box/2]^3`` into ``resolution^3`` equal cubes; points
  outside are clipped to the nearest cell.
  """
  cell = jnp.floor((points / box_size + 0.5) * resolution).astype(jnp.int32)
  return jnp.clip(cell, 0, resolution - 1)


def lattice_lookup(lattice: jax.Array, points: jax.Array, box_size: float = 2.0) -> jax.Array:
  """Trilinear interpolation of a ``[n, n, n]`` lattice over the box at ``points [..., 3]``.

  Lattice point ``(i, j, k)`` sits at ``-box/2 + (i, j, k) * box / (n - 1)``;
  points outside the box take the nearest face's values.
  """
  n = lattice.shape[0]
  u = jnp.clip((points / box_size + 0.5) * (n - 1), 0.0, n - 1)
  i0 = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, n - 2)
  f = u - i0
  flat = lattice.reshape(-1)
  out = 0.0
  for dx in (0, 1):
    for dy in (0, 1):
      for dz in (0, 1):
        index = ((i0[..., 0] + dx) * n + i0[..., 1] + dy) * n + i0[..., 2] + dz
        weight = ((f[..., 0] if dx else 1 - f[..., 0]) * (f[..., 1] if dy else 1 - f[..., 1])
                  * (f[..., 2] if dz else 1 - f[..., 2]))
        out = out + weight * flat[index]
  return out


def probe_occupancy(origin: jax.Array, direction: jax.Array, start: jax.Array,
                    end: jax.Array, grid: jax.Array, num_probes: int,
                    box_size: float = 2.0) -> jax.Array:
  """``[..., P]`` bool: the occupancy of each probe segment of rays.

  Args:
    origin, direction: ``[..., 3]``.
    start, end: ``[...]`` the ray's span in the box (``end <= start``: no span).
    grid: ``[G, G, G]`` bool occupancy.
    num_probes: ``P``, probes a ray (segment midpoints).
    box_size: side of the cube.
  """
  resolution = grid.shape[0]
  offsets = (np.arange(num_probes, dtype=np.float32) + 0.5) / np.float32(num_probes)
  depths = start[..., None] + (end - start)[..., None] * offsets
  cells = grid_cells(sample_points(origin, direction, depths), resolution, box_size)
  occupied = grid.reshape(-1)[(cells[..., 0] * resolution + cells[..., 1]) * resolution
                              + cells[..., 2]]
  return occupied & (end > start)[..., None]


def occupied_depths(s: jax.Array, occupied: jax.Array, start: jax.Array,
                    end: jax.Array) -> jax.Array:
  """Maps occupied-length coordinates to depths along rays.

  Args:
    s: ``[..., S]`` coordinates in ``[0, L]`` (in depth units).
    occupied: ``[..., P]`` bool probe occupancy (:func:`probe_occupancy`).
    start, end: ``[...]`` the span the probes cover.

  Returns:
    ``[..., S]`` depths: the point ``s`` along the occupied segments laid end
    to end. A ray with no occupied segment maps everything to ``end``.
  """
  num_probes = occupied.shape[-1]
  step = ((end - start) / num_probes)[..., None]
  count = jnp.cumsum(occupied.astype(jnp.int32), axis=-1)  # [..., P] inclusive
  total = count[..., -1:]
  scaled = s / jnp.where(step > 0, step, 1.0)
  j = jnp.clip(jnp.floor(scaled), 0, jnp.maximum(total - 1, 0)).astype(jnp.int32)
  fraction = jnp.clip(scaled - j, 0.0, 1.0)
  # The (j + 1)-th occupied probe: the occupied probes' indices scattered to their ranks
  # (P writes and S reads a ray, instead of comparing every sample with every probe).
  probes = jnp.broadcast_to(jnp.arange(num_probes, dtype=jnp.int32), occupied.shape)
  rank = jnp.where(occupied, count - 1, num_probes)  # unoccupied probes write past the end
  flat_rank = rank.reshape(-1, num_probes)
  by_rank = jax.vmap(lambda r, p: jnp.full((num_probes,), num_probes, jnp.int32).at[r].set(
      p, mode="drop"))(flat_rank, probes.reshape(-1, num_probes)).reshape(occupied.shape)
  probe = jnp.take_along_axis(by_rank, j, axis=-1)
  probe = jnp.where(total > 0, probe, num_probes)
  return jnp.minimum(start[..., None] + (probe + fraction) * step, end[..., None])


def occupied_length(occupied: jax.Array, start: jax.Array, end: jax.Array) -> jax.Array:
  """``[...]`` the total length ``L`` of the occupied probe segments of rays."""
  num_probes = occupied.shape[-1]
  return jnp.sum(occupied, axis=-1) * ((end - start) / num_probes)


def alive_intervals(weights: jax.Array, threshold: float) -> jax.Array:
  """``[..., S - 1]`` bool: intervals whose transmittance in front is ``>= threshold``.

  The transmittance in front of interval ``i`` is ``1 - sum(w[:i])``; once it
  falls below ``threshold`` nothing behind can change a pixel by more than it.
  """
  ahead = jnp.cumsum(weights, axis=-1) - weights
  return (1.0 - ahead) >= threshold


def composite_spans(rgb: jax.Array, raw_density: jax.Array, s: jax.Array, depths: jax.Array,
                    threshold: float = 0.0):
  """:func:`composite` over samples placed in occupied length, with termination.

  The intervals are measured in ``s`` (the empty gaps between occupied spans
  hold no density and are left out); the depth is averaged over the depths
  ``t(s)`` of the interval midpoints; intervals whose transmittance in front
  is below ``threshold`` get weight 0 (:func:`alive_intervals`).

  Args:
    rgb: ``[..., S, 3]``; raw_density ``[..., S]``.
    s: ``[..., S]`` sorted occupied-length coordinates.
    depths: ``[..., S]`` their depths.
    threshold: early-termination transmittance; 0 keeps every interval.

  Returns:
    ``(weights [..., S-1], rgb [..., 3], opacity [...], depth [...])`` as
    :func:`composite`.
  """
  weights, _, _, _ = composite(rgb, raw_density, s)
  if threshold > 0:
    weights = jnp.where(alive_intervals(weights, threshold), weights, 0.0)
  rgb_mid = (rgb[..., :-1, :] + rgb[..., 1:, :]) / 2
  depth_mid = (depths[..., :-1] + depths[..., 1:]) / 2
  rgb_out = jnp.sum(weights[..., None] * rgb_mid, axis=-2)
  opacity = jnp.sum(weights, axis=-1)
  seen = opacity > 0
  depth_sum = jnp.sum(weights * depth_mid, axis=-1)
  depth = jnp.where(seen, depth_sum / jnp.where(seen, opacity, 1.0), jnp.inf)
  return weights, rgb_out, opacity, depth
