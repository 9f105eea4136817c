"""Per-sample view logic of the training loader: pure numpy functions.

* ``canonicalize_cameras``: move every camera of a sample so the chosen source
  view becomes the released model's default source camera
  (``cameras.DEFAULT_SOURCE_CAMERA``: at ``(1, 0, 0)`` looking at the origin,
  ``+z`` up). The LRM always assumes its input was taken from that camera.
* ``select_views``: one source view and the supervision views.
* ``composite``, ``resize``, ``crop_box``: image handling.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vf3d_jax.rendering import cameras


def canonical_c2w() -> np.ndarray:
  """``[4, 4]`` camera-to-world of the default source camera."""
  c2w, _ = cameras.split_conditioning(cameras.DEFAULT_SOURCE_CAMERA, xp=np)
  return c2w.astype(np.float64)


def canonicalize_cameras(c2w: np.ndarray, source_index: int,
                         canonical_distance: float | None = 1.0,
                         canonical: np.ndarray | None = None):
  """Re-expresses a sample's cameras so the source camera is canonical.

  With ``C_s`` the source camera at distance ``d`` from the origin and ``C_0``
  the canonical camera moved along its axis to distance ``d``, the rigid map
  ``M = C_0 inv(C_s)`` takes the source camera onto ``C_0`` and keeps the
  point the source looks at (the origin, for our renders) in place. The
  world is then scaled by ``s = canonical_distance / d`` about the origin, so
  the source sits exactly at the canonical camera (OpenLRM's
  ``normed_dist_to_center``; ``None`` keeps ``d``, ``s = 1``). Scaling the
  whole scene changes no image, so every view stays consistent with its
  pixels; relative rotations are unchanged and relative translations are
  scaled by ``s``. Depths, if used, scale by ``s`` too.

  Args:
    c2w: ``[V, 4, 4]`` OpenGL camera-to-world matrices of one sample.
    source_index: which view is the source.
    canonical_distance: distance of the canonical camera from the origin
      (1 for the released model), or ``None`` to keep the source's distance.
    canonical: ``[4, 4]`` canonical pose (default: ``canonical_c2w()``).

  Returns:
    ``(c2w [V, 4, 4] float32, world_transform [4, 4] float64, scale)``:
    the new cameras, the similarity ``p_new = world_transform @ p_old`` on
    homogeneous world points, and ``s``.

  Raises:
    ValueError: the source camera sits at the origin.
  """
  c2w = np.asarray(c2w, np.float64)
  canonical = canonical_c2w() if canonical is None else np.asarray(canonical, np.float64)
  source = c2w[source_index]
  distance = float(np.linalg.norm(source[:3, 3]))
  if distance < 1e-8:
    raise ValueError("source camera at the origin: no distance to normalise")
  moved = canonical.copy()
  moved[:3, 3] *= distance / np.linalg.norm(canonical[:3, 3])
  rigid = moved @ np.linalg.inv(source)
  scale = 1.0 if canonical_distance is None else float(canonical_distance) / distance
  world = np.diag([scale, scale, scale, 1.0]) @ rigid
  # Cameras keep unit rotation axes: scale only their positions.
  unscale = np.diag([1.0 / scale, 1.0 / scale, 1.0 / scale, 1.0])
  return (world @ c2w @ unscale).astype(np.float32), world, scale


def select_views(rng: np.random.Generator, num_views: int, num_render_views: int,
                 include_source: bool = True, num_source_candidates: int | None = None,
                 source: int = -1):
  """Chooses the source view and the supervision views.

  Args:
    rng: random generator.
    num_views: views in the record.
    num_render_views: supervision views ``N``.
    include_source: the source view is supervision view 0, the other ``N - 1``
      are distinct other views; otherwise all ``N`` differ from the source.
    num_source_candidates: the source is drawn from the first this many views
      (e.g. the orbit); all views when ``None`` or 0.
    source: a fixed source view index; ``-1`` draws it as above.

  Returns:
    ``(source_index, render_indices [N] int)``.

  Raises:
    ValueError: too few views.
  """
  needed = num_render_views + (0 if include_source else 1)
  if num_views < max(needed, 1):
    raise ValueError(f"{num_views} views, need {needed}")
  if source >= num_views:
    raise ValueError(f"source view {source} of a record with {num_views} views")
  if source < 0:
    candidates = num_source_candidates or num_views
    source = int(rng.integers(min(candidates, num_views)))
  others = np.array([v for v in range(num_views) if v != source])
  if include_source:
    chosen = rng.choice(others, size=num_render_views - 1, replace=False) if num_render_views > 1 \
        else np.zeros((0,), int)
    render = np.concatenate([[source], chosen]).astype(np.int64)
  else:
    render = rng.choice(others, size=num_render_views, replace=False).astype(np.int64)
  return source, render


def composite(rgba: np.ndarray, background) -> tuple[np.ndarray, np.ndarray]:
  """``(rgb [H, W, 3], alpha [H, W])`` float32 of uint8 straight-alpha RGBA
  over a background colour ``[3]`` in ``[0, 1]``."""
  alpha = rgba[..., 3].astype(np.float32) * np.float32(1 / 255)
  rgb = rgba[..., :3].astype(np.float32) * (alpha * np.float32(1 / 255))[..., None]
  rgb += np.asarray(background, np.float32) * (1.0 - alpha)[..., None]
  return rgb, alpha


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes ``[H, W]`` or ``[H, W, C]`` float32 to ``size x size``.

  Bilinear, with PIL's antialiasing when shrinking; an exact integer shrink is
  a box average. Composite before resizing: colours are then premultiplied.
  """
  height, width = image.shape[:2]
  if (height, width) == (size, size):
    return image.astype(np.float32)
  if height == width and height % size == 0:
    return box_downsample(image, height // size)
  channels = image[..., None] if image.ndim == 2 else image
  # A 2-D float32 array is a PIL "F" image: no quantisation.
  resized = np.stack([np.asarray(Image.fromarray(
      np.ascontiguousarray(channels[..., c], np.float32)).resize((size, size), Image.BILINEAR))
                      for c in range(channels.shape[-1])], axis=-1)
  return resized[..., 0] if image.ndim == 2 else resized


def box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
  """Mean over ``factor x factor`` blocks of ``[H, W, ...]`` (H, W multiples)."""
  total = np.zeros((image.shape[0] // factor, image.shape[1] // factor) + image.shape[2:],
                   np.float32)
  # Strided slices add fast; a reshape-and-mean over strided axes does not.
  for dy in range(factor):
    for dx in range(factor):
      total += image[dy::factor, dx::factor]
  return total * np.float32(1.0 / (factor * factor))


def crop_box(rng: np.random.Generator, resolution: int, crop_size: int) -> np.ndarray:
  """``[3]`` int32 ``(start_x, start_y, size)`` of a uniformly placed crop."""
  if crop_size > resolution:
    raise ValueError(f"crop {crop_size} larger than the render resolution {resolution}")
  limit = resolution - crop_size + 1
  return np.array([rng.integers(limit), rng.integers(limit), crop_size], np.int32)
