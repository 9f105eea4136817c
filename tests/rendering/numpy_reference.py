"""A plain NumPy (float64) renderer of one triplane, from the released renderer's description.

It follows the released PyTorch renderer step by step (OpenLRM's
``ImportanceRenderer``, ``MipRayMarcher2``, ``get_ray_limits_box``,
``sample_pdf``) and shares no code with vf3d_jax: its own rays, bilinear
sampling, decoder, slab test, marcher and inverse-CDF sampling. Slow and
simple; for small test inputs only.

Everything is float64 except, in the compatible mode, the sample geometry:
the released code decides whether a sample is inside the box from its float32
position, and with jitter 0 the first and last stratified samples lie on the
box surface by construction, so float32 rounding decides them (some rays
that leave through a face have their last sample a rounding step outside).
There the reference repeats the released float32 arithmetic, one rounding per
operation as NumPy and PyTorch do: the slab depths ``(bound - o) * (1 / d)``,
the coarse depths ``start + k / (n - 1) * (end - start)`` plus the jitter, the
positions ``o + t * d`` and the inclusive test against ``[-1, 1]``. Rays must
then be given in float32, as the renderer under test gets them.

The clean mode counts samples on the surface as inside (its own rule): its
in-box test on float64 positions allows 1e-9.
"""

from __future__ import annotations

import numpy as np

OUTSIDE_RAW_DENSITY = np.float64(np.float32(np.finfo(np.float32).min) / np.float32(3))
SURFACE_TOLERANCE = 1e-9


def rays_for_view(c2w, intrinsics, resolution, crop=None):
  """Rays through pixel centres of a square image (or a crop of it).

  Args:
    c2w: [4, 4] OpenGL camera-to-world.
    intrinsics: [4] (fx, fy, cx, cy), normalised by the image size.
    resolution: side of the full image.
    crop: optional (start_x, start_y, size).

  Returns:
    (origins [N, 3], directions [N, 3]) float64, row-major over the crop.
  """
  c2w = np.asarray(c2w, np.float64)
  fx, fy, cx, cy = np.asarray(intrinsics, np.float64)
  start_x, start_y, size = (0, 0, resolution) if crop is None else crop
  origins, directions = [], []
  for i in range(start_y, start_y + size):
    for j in range(start_x, start_x + size):
      x = (j + 0.5) / resolution
      y = (i + 0.5) / resolution
      opencv = np.array([(x - cx) / fx, (y - cy) / fy, 1.0])
      opengl = opencv * np.array([1.0, -1.0, -1.0])
      d = c2w[:3, :3] @ opengl
      directions.append(d / np.linalg.norm(d))
      origins.append(c2w[:3, 3])
  return np.array(origins), np.array(directions)


def bilinear(plane, u, v):
  """PyTorch grid_sample(bilinear, zeros, align_corners=False) of one plane.

  Args:
    plane: [H, W, C].
    u, v: [N] normalised coordinates; u indexes the width, v the height.

  Returns:
    [N, C].
  """
  plane = np.asarray(plane, np.float64)
  height, width, channels = plane.shape
  out = np.zeros((len(u), channels))
  for n in range(len(u)):
    x = ((u[n] + 1) * width - 1) / 2
    y = ((v[n] + 1) * height - 1) / 2
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
      for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
        if 0 <= yi < height and 0 <= xi < width:
          out[n] += wy * wx * plane[yi, xi]
  return out


def field(layers, planes, points, box_size):
  """Raw density [N] and colour [N, 3] at points [N, 3].

  Args:
    layers: list of (weight [in, out], bias [out]); ReLU between them.
    planes: [3, H, W, C], planes XY, XZ, ZY.
  """
  p = np.asarray(points, np.float64) * (2.0 / box_size)
  x, y, z = p[:, 0], p[:, 1], p[:, 2]
  features = np.concatenate([bilinear(planes[0], x, y), bilinear(planes[1], x, z),
                             bilinear(planes[2], z, y)], axis=-1)
  h = features
  for i, (w, b) in enumerate(layers):
    h = h @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    if i < len(layers) - 1:
      h = np.maximum(h, 0)
  rgb = 1 / (1 + np.exp(-h[:, 1:])) * 1.002 - 0.001
  return h[:, 0], rgb


def torch_softplus(x):
  """F.softplus (beta 1, threshold 20)."""
  with np.errstate(over="ignore"):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def ray_limits(origins, directions, box_size):
  """get_ray_limits_box: entry/exit depths, -1/-2 for rays that miss.

  Computed in the dtype of ``origins`` (float32 rays: the released float32
  depths, bit for bit).
  """
  dtype = np.asarray(origins).dtype
  half = box_size / 2
  bounds = np.array([[-half] * 3, [half] * 3], dtype)
  t_min = np.empty(len(origins), dtype)
  t_max = np.empty(len(origins), dtype)
  for r, (o, d) in enumerate(zip(origins, directions)):
    with np.errstate(divide="ignore"):
      inv = dtype.type(1) / d
    sign = (inv < 0).astype(int)
    lo = (bounds[sign[0], 0] - o[0]) * inv[0]
    hi = (bounds[1 - sign[0], 0] - o[0]) * inv[0]
    valid = True
    for axis in (1, 2):
      a_lo = (bounds[sign[axis], axis] - o[axis]) * inv[axis]
      a_hi = (bounds[1 - sign[axis], axis] - o[axis]) * inv[axis]
      if lo > a_hi or a_lo > hi:
        valid = False
      lo, hi = max(lo, a_lo), min(hi, a_hi)
    t_min[r], t_max[r] = (lo, hi) if valid else (-1.0, -2.0)
  return t_min, t_max


def march(colors, densities, depths):
  """MipRayMarcher2 without the background and the depth clamp.

  Args:
    colors [N, S, 3], densities [N, S] raw, depths [N, S].

  Returns:
    (weights [N, S-1], rgb [N, 3], opacity [N], depth [N] with NaN -> inf).
  """
  deltas = depths[:, 1:] - depths[:, :-1]
  colors_mid = (colors[:, :-1] + colors[:, 1:]) / 2
  densities_mid = torch_softplus((densities[:, :-1] + densities[:, 1:]) / 2 - 1)
  depths_mid = (depths[:, :-1] + depths[:, 1:]) / 2
  alpha = 1 - np.exp(-densities_mid * deltas)
  weights = np.zeros_like(alpha)
  for r in range(alpha.shape[0]):
    transmittance = 1.0
    for k in range(alpha.shape[1]):
      weights[r, k] = alpha[r, k] * transmittance
      transmittance *= 1 - alpha[r, k] + 1e-10
  rgb = (weights[..., None] * colors_mid).sum(1)
  opacity = weights.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    depth = (weights * depths_mid).sum(1) / opacity
  depth = np.where(np.isnan(depth), np.inf, depth)
  return weights, rgb, opacity, depth


def importance(depths, weights, uniforms):
  """sample_importance + sample_pdf, one ray at a time.

  Args:
    depths [N, S] coarse depths, weights [N, S-1], uniforms [N, F].

  Returns:
    [N, F] fine depths.
  """
  out = np.zeros(uniforms.shape)
  for r in range(depths.shape[0]):
    w = weights[r]
    # max_pool1d(2, 1, padding=1): padding is -inf.
    padded = np.concatenate([[-np.inf], w, [-np.inf]])
    pooled = np.array([max(padded[i], padded[i + 1]) for i in range(len(padded) - 1)])
    smoothed = np.array([(pooled[i] + pooled[i + 1]) / 2 for i in range(len(pooled) - 1)])
    smoothed = smoothed + 0.01
    bins = (depths[r, :-1] + depths[r, 1:]) / 2
    pdf_w = smoothed[1:-1] + 1e-5
    pdf = pdf_w / pdf_w.sum()
    cdf = np.concatenate([[0.0], np.cumsum(pdf)])
    num_bins = len(pdf_w)
    for f, u in enumerate(uniforms[r]):
      index = np.searchsorted(cdf, u, side="right")
      below = max(index - 1, 0)
      above = min(index, num_bins)
      denom = cdf[above] - cdf[below]
      if denom < 1e-5:
        denom = 1.0
      out[r, f] = bins[below] + (u - cdf[below]) / denom * (bins[above] - bins[below])
  return out


def coarse_depths(origins, directions, jitter, *, mode="compatible", box_size=2.0):
  """Sample ranges and stratified depths of rays.

  The compatible mode computes in float32 as released: ``math_utils.linspace``
  (``start + k / (n - 1) * (end - start)``), then ``+ jitter * (end - start) /
  (n - 1)``, one rounding per operation, so with jitter 0 the last depth is
  ``start + (end - start)``, which may lie a rounding step past ``end``.

  Args:
    origins, directions: [N, 3] (float32 for the compatible mode).
    jitter: [N, num_coarse] in [0, 1).
    mode: "compatible" or "clean".

  Returns:
    (start [N], end [N], hit [N] bool, depths [N, num_coarse]) float64 values.
  """
  geometry = np.float32 if mode == "compatible" else np.float64
  origins = np.asarray(origins, geometry)
  directions = np.asarray(directions, geometry)
  jitter = np.asarray(jitter, geometry)
  t_min, t_max = ray_limits(origins, directions, box_size)
  hit = t_max > t_min
  if mode == "compatible":
    start, end = t_min.copy(), t_max.copy()
    if hit.any():
      start[~hit] = t_min[hit].min()
      end[~hit] = t_min[hit].max()
  else:
    hit &= t_max > 0
    start = np.where(hit, np.maximum(t_min, 0), 0.0)
    end = np.where(hit, t_max, 0.0)
  num_coarse = jitter.shape[1]
  steps = np.arange(num_coarse, dtype=geometry) / geometry(num_coarse - 1)
  span = end - start
  depths = start[:, None] + steps[None] * span[:, None]
  depths = depths + jitter * (span / geometry(num_coarse - 1))[:, None]
  return (start.astype(np.float64), end.astype(np.float64), hit,
          depths.astype(np.float64))


def released_points(origins, directions, depths, box_size=2.0):
  """The released sample positions and in-box test, in float32.

  Args:
    origins, directions: [N, 3] float32.
    depths: [N, S] (rounded to float32).

  Returns:
    (points [N, S, 3] float32 ``o + t * d``, inside [N, S] bool: all three
    coordinates in ``[-box_size/2, box_size/2]``, inclusive).
  """
  origins = np.asarray(origins, np.float32)
  directions = np.asarray(directions, np.float32)
  points = origins[:, None] + np.asarray(depths, np.float32)[..., None] * directions[:, None]
  half = box_size / 2
  return points, np.all((-half <= points) & (points <= half), axis=-1)


def render_view(layers, planes, origins, directions, jitter, uniforms, *,
                mode="compatible", box_size=2.0, background=(1.0, 1.0, 1.0)):
  """Renders the rays of one view.

  Args:
    layers: decoder as in :func:`field`.
    planes: [3, H, W, C].
    origins, directions: [N, 3]; float32 for the compatible mode (its
      sample geometry is float32 arithmetic on them).
    jitter: [N, num_coarse] in [0, 1).
    uniforms: [N, num_fine] (num_fine may be 0).
    mode: "compatible" or "clean" (see vf3d_jax.rendering.renderer).

  Returns:
    (rgb [N, 3], depth [N], opacity [N]).
  """
  compatible = mode == "compatible"
  uniforms = np.asarray(uniforms, np.float64)
  start, end, hit, coarse = coarse_depths(origins, directions, jitter, mode=mode,
                                          box_size=box_size)
  geometry = np.float32 if compatible else np.float64
  origins = np.asarray(origins, geometry)
  directions = np.asarray(directions, geometry)

  def evaluate(depths):
    if compatible:
      points, inside = released_points(origins, directions, depths, box_size)
    else:
      points = origins[:, None] + depths[..., None] * directions[:, None]
      inside = np.all(np.abs(points) <= box_size / 2 + SURFACE_TOLERANCE, axis=-1)
      # Nothing behind the camera or on a ray that misses.
      inside &= hit[:, None] & (depths >= 0)
    raw, rgb = field(layers, planes, points.reshape(-1, 3).astype(np.float64), box_size)
    raw = np.where(inside.reshape(-1), raw, OUTSIDE_RAW_DENSITY)
    rgb = np.where(inside.reshape(-1)[:, None], rgb, 0.0)
    return rgb.reshape(depths.shape + (3,)), raw.reshape(depths.shape)

  colors, densities = evaluate(coarse)
  depths = coarse
  if uniforms.shape[1] > 0:
    weights, _, _, _ = march(colors, densities, coarse)
    fine = importance(coarse, weights, uniforms)
    fine_colors, fine_densities = evaluate(fine)
    depths = np.concatenate([coarse, fine], 1)
    colors = np.concatenate([colors, fine_colors], 1)
    densities = np.concatenate([densities, fine_densities], 1)
    order = np.argsort(depths, axis=1, kind="stable")
    depths = np.take_along_axis(depths, order, 1)
    colors = np.take_along_axis(colors, order[..., None], 1)
    densities = np.take_along_axis(densities, order, 1)
  _, rgb, opacity, depth = march(colors, densities, depths)
  if mode == "clean":
    depth = np.clip(depth, start, end)
  else:
    depth = np.clip(depth, depths.min(), depths.max())
  rgb = rgb + np.asarray(background) * (1 - opacity)[:, None]
  return rgb, depth, opacity
