"""A matting benchmark with known alpha: procedural objects on hard backgrounds.

Each case is a procedural asset rendered with its exact alpha, placed on a
square canvas (centred, off-centre, or cut by the image border) and
composited ``a F + (1 - a) B`` over one of five backgrounds:

* ``plain``: a near-white studio backdrop with sensor noise (the control);
* ``gradient``: a linear two-colour ramp at a random angle, with noise;
* ``noise``: a multi-octave coloured noise texture;
* ``clutter``: other shapes (boxes and discs in random colours, some touching
  the border), slightly defocused;
* ``photo``: a low-frequency random colour field with vignetting and grain,
  as a defocused photographic background.

``score`` reports the mean IoU of a matting function's ``alpha > 0.5``
against the known mask, per background and overall. Cases come from seeds,
so the benchmark is the same everywhere and needs no files:
``python -m tools.bench_matting`` prints the table.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
from scipy import ndimage

BACKGROUNDS = ("plain", "gradient", "noise", "clutter", "photo")
PLACEMENTS = ("centre", "off_centre", "border")


def render_foregrounds(num: int, resolution: int, seed: int = 0) -> np.ndarray:
  """``[num, R, R, 4]`` float32 straight-alpha renders of procedural assets
  (every kind, colour and pattern; one random view each)."""
  from vf3d_jax.data import orbits, procedural, raytrace  # pylint: disable=import-outside-toplevel
  assets = [procedural.sample_asset(seed, i, 3) for i in range(num)]
  spec = orbits.ViewSpec(num_orbit_views=1, radius=2.4, orbit_elevation_range=(0.1, 0.6),
                         random_azimuth_offset=True)
  cams = [orbits.sample_views(spec, np.random.default_rng([seed, i, 7])) for i in range(num)]
  packed = procedural.pack_assets(assets, 3)
  c2w = np.stack([c["c2w"] for c in cams])
  intrinsics = np.stack([c["intrinsics"] for c in cams])
  rgba, _ = raytrace.render_assets(packed, c2w, intrinsics, resolution, 2)
  return np.asarray(rgba, np.float32)[:, 0]


def _smooth_noise(rng, size: int, sigma: float, channels: int = 3) -> np.ndarray:
  field = ndimage.gaussian_filter(rng.normal(size=(size, size, channels)), (sigma, sigma, 0))
  field -= field.min(axis=(0, 1))
  return field / np.maximum(field.max(axis=(0, 1)), 1e-6)


def make_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
  """``[size, size, 3]`` float32 background of one ``BACKGROUNDS`` kind."""
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  if kind == "plain":
    image = np.full((size, size, 3), rng.uniform(0.9, 1.0)) + rng.normal(0, 0.01, (size, size, 3))
  elif kind == "gradient":
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) * np.sqrt(2) + 0.5
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    image = a + (b - a) * np.clip(t, 0, 1)[..., None] + rng.normal(0, 0.01, (size, size, 3))
  elif kind == "noise":
    image = sum(_smooth_noise(rng, size, s) * w for s, w in ((1.5, 0.3), (4, 0.3), (12, 0.4)))
    tint = rng.uniform(0.3, 1.0, 3)
    image = image * tint + (1 - tint) * rng.uniform(0, 1, 3) * 0.5
  elif kind == "clutter":
    image = np.full((size, size, 3), rng.uniform(0.2, 1.0, 3))
    for _ in range(rng.integers(6, 14)):
      colour = rng.uniform(0, 1, 3)
      cy, cx = rng.uniform(-0.1, 1.1, 2)
      ry, rx = rng.uniform(0.05, 0.25, 2)
      if rng.random() < 0.5:
        inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
      else:
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
      image[inside] = colour
    image = ndimage.gaussian_filter(image, (1.5, 1.5, 0))
  elif kind == "photo":
    base = _smooth_noise(rng, size, size / 8) * rng.uniform(0.4, 1.0) + rng.uniform(0, 0.4, 3)
    vignette = 1 - 0.5 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    image = base * vignette[..., None] + rng.normal(0, 0.02, (size, size, 3))
  else:
    raise ValueError(f"unknown background {kind!r}; one of {BACKGROUNDS}")
  return np.clip(image, 0, 1).astype(np.float32)


def place(foreground: np.ndarray, size: int, placement: str,
          rng: np.random.Generator) -> np.ndarray:
  """Pastes an RGBA render into a transparent ``size``-square canvas."""
  res = foreground.shape[0]
  canvas = np.zeros((size, size, 4), np.float32)
  rows = np.flatnonzero(foreground[..., 3].max(axis=1) > 0.5)
  cols = np.flatnonzero(foreground[..., 3].max(axis=0) > 0.5)
  if placement == "centre":
    top, left = (size - res) // 2, (size - res) // 2
  elif placement == "off_centre":
    top, left = rng.integers(0, size - res + 1, 2)
  elif placement == "border":  # cut by one image edge
    top, left = rng.integers(0, size - res + 1, 2)
    side = rng.integers(4)
    if side == 0:
      top = -rows[0] - int(0.15 * (rows[-1] - rows[0]))
    elif side == 1:
      top = size - rows[-1] - 1 + int(0.15 * (rows[-1] - rows[0]))
    elif side == 2:
      left = -cols[0] - int(0.15 * (cols[-1] - cols[0]))
    else:
      left = size - cols[-1] - 1 + int(0.15 * (cols[-1] - cols[0]))
  else:
    raise ValueError(f"unknown placement {placement!r}; one of {PLACEMENTS}")
  r0, c0 = max(0, top), max(0, left)
  r1, c1 = min(size, top + res), min(size, left + res)
  canvas[r0:r1, c0:c1] = foreground[r0 - top:r1 - top, c0 - left:c1 - left]
  return canvas


def make_cases(num: int = 40, size: int = 256, object_size: int = 160,
               seed: int = 0) -> list[dict]:
  """``num`` cases, cycling through every background and placement.

  Returns:
    Dicts of ``rgb [S, S, 3]``, ``alpha [S, S]`` (float32), ``background`` and
    ``placement`` names.
  """
  foregrounds = render_foregrounds(num, object_size, seed)
  cases = []
  for i, foreground in enumerate(foregrounds):
    rng = np.random.default_rng([seed, i, 11])
    kind = BACKGROUNDS[i % len(BACKGROUNDS)]
    placement = PLACEMENTS[(i // len(BACKGROUNDS)) % len(PLACEMENTS)]
    rgba = place(foreground, size, placement, rng)
    background = make_background(kind, size, rng)
    alpha = rgba[..., 3:]
    rgb = rgba[..., :3] * alpha + background * (1 - alpha)
    cases.append(dict(rgb=rgb.astype(np.float32), alpha=alpha[..., 0],
                      background=kind, placement=placement))
  return cases


def iou(pred: np.ndarray, target: np.ndarray) -> float:
  """IoU of ``pred > 0.5`` and ``target > 0.5``."""
  p, t = pred > 0.5, target > 0.5
  union = np.logical_or(p, t).sum()
  return float(np.logical_and(p, t).sum() / union) if union else 1.0


# A matte below this IoU counts as failed when scoring the confidence check.
FAILED_IOU = 0.85


def score(matting_fn: Callable[[np.ndarray], np.ndarray], cases: list[dict],
          check: bool = False, check_options: dict | None = None) -> dict:
  """Mean IoU overall, per background and per placement, and seconds per image.

  With ``check``, also how ``inference.matting.check_matte`` judges each
  matte: the fraction warned, the failures (IoU < ``FAILED_IOU``) it warns
  of, the good mattes it warns of, and the mean IoU of the mattes it passes
  (``check_options``: its keyword arguments, as
  ``preprocess.BUILTIN_MATTES`` gives them per method).
  """
  from vf3d_jax.inference import matting  # pylint: disable=g-import-not-at-top

  ious, warned, seconds = [], [], 0.0
  for case in cases:
    start = time.perf_counter()
    alpha = np.asarray(matting_fn(case["rgb"]))
    seconds += time.perf_counter() - start
    ious.append(iou(alpha, case["alpha"]))
    if check:
      warned.append(matting.check_matte(case["rgb"], alpha, **(check_options or {})).too_complex)
  seconds /= max(len(cases), 1)
  ious = np.asarray(ious)
  result = {"mean_iou": float(ious.mean()), "min_iou": float(ious.min()),
            "seconds_per_image": seconds, "per_case": ious.tolist()}
  if check:
    warned = np.asarray(warned, bool)
    failed = ious < FAILED_IOU
    result.update(
        warned_fraction=float(warned.mean()),
        failures_warned=f"{int((failed & warned).sum())}/{int(failed.sum())}",
        good_warned=f"{int((~failed & warned).sum())}/{int((~failed).sum())}",
        unwarned_mean_iou=float(ious[~warned].mean()) if (~warned).any() else float("nan"),
        per_case_warned=warned.tolist())
  for key, names in (("background", BACKGROUNDS), ("placement", PLACEMENTS)):
    for name in names:
      picked = [v for v, c in zip(ious, cases) if c[key] == name]
      if picked:
        result[f"{key}/{name}"] = float(np.mean(picked))
  return result
