"""The released renderer's float32 arithmetic, re-stated in PyTorch.

Written from a reading of the released ``ImportanceRenderer`` (OpenLRM /
VFusion3D ``lrm/models/rendering/utils/{renderer,ray_marcher,math_utils}.py``)
for one view at a time, with injectable randomness. It keeps the released
order of operations where float32 rounding decides an outcome:

* ``get_ray_limits_box``: the slabs are taken axis by axis (x, then y, then z),
  each depth as ``(bound - origin) * (1 / direction)``;
* ``math_utils.linspace``: ``start + k / (n - 1) * (end - start)``, then the
  jitter ``u * (end - start) / (n - 1)`` is added, so the last sample is not
  exactly ``end``;
* ``_forward_pass``: the in-box test is on the float32 sample positions
  ``origin + depth * direction``, inclusive, against ``[-1, 1]``;
* ``unify_samples``: ``torch.sort`` of the merged depths.

The field is :func:`tests.torch_reference.query_field` (the released
``grid_sample`` + ``OSGDecoder``). Nothing in the library imports this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests import torch_reference

OUTSIDE_RAW_DENSITY = torch.finfo(torch.float32).min / 3


def ray_limits(origins, directions, box_size=2.0):
  """Entry and exit depths of rays in the box; ``(-1, -2)`` for a miss.

  Args:
    origins: ``[N, 3]`` float32.
    directions: ``[N, 3]`` float32.

  Returns:
    ``(t_min [N], t_max [N])`` float32.
  """
  half = box_size / 2
  bounds = torch.tensor([[-half] * 3, [half] * 3], dtype=origins.dtype)
  inverse = 1 / directions
  negative = (inverse < 0).long()
  valid = torch.ones(origins.shape[0], dtype=torch.bool)
  t_min = t_max = None
  for axis in range(3):
    near = (bounds[negative[:, axis], axis] - origins[:, axis]) * inverse[:, axis]
    far = (bounds[1 - negative[:, axis], axis] - origins[:, axis]) * inverse[:, axis]
    if axis == 0:
      t_min, t_max = near, far
      continue
    valid &= ~((t_min > far) | (near > t_max))
    t_min = torch.maximum(t_min, near)
    t_max = torch.minimum(t_max, far)
  t_min = torch.where(valid, t_min, torch.tensor(-1.0))
  t_max = torch.where(valid, t_max, torch.tensor(-2.0))
  return t_min, t_max


def _evaluate(decoder, planes, origins, directions, depths):
  """Masked colour ``[N, S, 3]`` and raw density ``[N, S]`` at the samples."""
  points = origins[:, None, :] + depths[..., None] * directions[:, None, :]
  inside = ((-1.0 <= points) & (points <= 1.0)).all(-1)
  raw, rgb = torch_reference.query_field(decoder, planes, points.reshape(-1, 3))
  raw = raw.reshape(depths.shape)
  rgb = rgb.reshape(depths.shape + (3,))
  raw = torch.where(inside, raw, torch.tensor(OUTSIDE_RAW_DENSITY))
  rgb = torch.where(inside[..., None], rgb, torch.tensor(0.0))
  return rgb, raw


def _march(rgb, raw, depths):
  """MipRayMarcher2: ``(weights [N, S-1], rgb [N, 3], depth [N])``."""
  deltas = depths[:, 1:] - depths[:, :-1]
  rgb_mid = (rgb[:, :-1] + rgb[:, 1:]) / 2
  sigma = F.softplus((raw[:, :-1] + raw[:, 1:]) / 2 - 1)
  depth_mid = (depths[:, :-1] + depths[:, 1:]) / 2
  alpha = 1 - torch.exp(-(sigma * deltas))
  shifted = torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], -1)
  weights = alpha * torch.cumprod(shifted, -1)[:, :-1]
  color = (weights[..., None] * rgb_mid).sum(1)
  depth = (weights * depth_mid).sum(1) / weights.sum(1)
  depth = torch.nan_to_num(depth, float("inf"))
  return weights, color, torch.clamp(depth, depths.min(), depths.max())


def _importance(depths, weights, uniforms):
  """sample_importance + sample_pdf with given uniforms ``[N, F]``."""
  smoothed = F.max_pool1d(weights[:, None], 2, 1, padding=1)
  smoothed = F.avg_pool1d(smoothed, 2, 1)[:, 0] + 0.01
  bins = 0.5 * (depths[:, :-1] + depths[:, 1:])
  pdf_weights = smoothed[:, 1:-1] + 1e-5
  num_bins = pdf_weights.shape[1]
  pdf = pdf_weights / pdf_weights.sum(-1, keepdim=True)
  cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
  index = torch.searchsorted(cdf, uniforms.contiguous(), right=True)
  below = torch.clamp_min(index - 1, 0)
  above = torch.clamp_max(index, num_bins)
  cdf_below, cdf_above = torch.gather(cdf, 1, below), torch.gather(cdf, 1, above)
  bins_below, bins_above = torch.gather(bins, 1, below), torch.gather(bins, 1, above)
  denom = cdf_above - cdf_below
  denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
  return bins_below + (uniforms - cdf_below) / denom * (bins_above - bins_below)


@torch.no_grad()
def render_view(decoder, planes, origins, directions, jitter, uniforms,
                box_size=2.0):
  """Renders the rays of one view the way the released renderer does.

  Args:
    decoder: :class:`tests.torch_reference.Decoder`.
    planes: ``[3, C, H, W]`` float32.
    origins, directions: ``[N, 3]`` float32.
    jitter: ``[N, num_coarse]`` in ``[0, 1)``.
    uniforms: ``[N, num_fine]`` in ``[0, 1]`` (``num_fine`` may be 0).

  Returns:
    ``(rgb [N, 3] on white, depth [N], opacity [N])`` float32.
  """
  t_min, t_max = ray_limits(origins, directions, box_size)
  hit = t_max > t_min
  start, end = t_min.clone(), t_max.clone()
  if hit.any():
    start[~hit] = t_min[hit].min()
    end[~hit] = t_min[hit].max()
  num_coarse = jitter.shape[1]
  steps = torch.arange(num_coarse, dtype=torch.float32) / (num_coarse - 1)
  depths = start[:, None] + steps[None] * (end - start)[:, None]
  depths = depths + jitter * ((end - start) / (num_coarse - 1))[:, None]
  rgb, raw = _evaluate(decoder, planes, origins, directions, depths)
  if uniforms.shape[1] > 0:
    weights, _, _ = _march(rgb, raw, depths)
    fine = _importance(depths, weights, uniforms)
    fine_rgb, fine_raw = _evaluate(decoder, planes, origins, directions, fine)
    depths = torch.cat([depths, fine], 1)
    rgb = torch.cat([rgb, fine_rgb], 1)
    raw = torch.cat([raw, fine_raw], 1)
    _, order = torch.sort(depths, dim=1)
    depths = torch.gather(depths, 1, order)
    rgb = torch.gather(rgb, 1, order[..., None].expand(-1, -1, 3))
    raw = torch.gather(raw, 1, order)
  weights, color, depth = _march(rgb, raw, depths)
  opacity = weights.sum(1)
  return color + 1 - opacity[:, None], depth, opacity

