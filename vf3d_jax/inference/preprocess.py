"""Input image preparation for single-image reconstruction.

The released model was fed images prepared this way (spec section 6):

1. read the image (EXIF orientation applied); an image whose longer side
   exceeds ``max_side`` (2048) is area-downscaled to it first, so memory and
   time stay bounded whatever the image's size or aspect ratio (the canvas
   below is ``max(H, W)`` squared);
2. find the object: an image with meaningful alpha keeps it, an opaque image
   gets an alpha matte (upstream: rembg ``isnet-general-use``; here a built-in
   border-colour matte or any ``matting_fn`` plugged in);
3. recentre on a square canvas of side ``max(H, W)``: the object's bounding box
   is area-resized so its longer side is ``int(ratio * side)`` and centred;
4. composite on white, ``rgb * a + (1 - a)``;
5. PyTorch bicubic resize to ``size x size`` with ``align_corners=True``, then
   clamp to ``[0, 1]``.

Everything is float32 in ``[0, 1]``; arrays are ``[H, W, C]``.

Deliberate differences from the upstream code, all confined to the edges of
the object:

* The area resize runs on float data with alpha-premultiplied colour;
  upstream resizes uint8 RGBA with straight colour (OpenCV ``INTER_AREA``,
  11-bit fixed-point weights when enlarging) and quantises to uint8 before the
  composite. Premultiplying keeps whatever colour hides under zero alpha out of
  the result; where alpha is 0 or 1 both agree.
* rembg's cut-out multiplies colour by the matte before upstream composites it
  again; here the matte is applied once.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Union

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from vf3d_jax.ops.resize import resize_bicubic

# An alpha matte from colour: rgb [H, W, 3] float32 in [0, 1] -> alpha [H, W].
MattingFn = Callable[[np.ndarray], np.ndarray]
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# Longest side the preprocessing works at: larger inputs are area-downscaled
# before matting. The model sees 512 x 512; at 2048 a step's arrays (float32
# RGBA canvas, matting temporaries) stay within a few hundred MB.
MAX_SIDE = 2048

# A pixel counts as foreground for the bounding box when its alpha would not
# round to 0 in 8 bits (upstream takes the nonzero pixels of a uint8 mask).
ALPHA_NONZERO = 0.5 / 255


class ImageLoadError(ValueError):
  """An image file is missing or cannot be decoded."""


class EmptyForegroundError(ValueError):
  """No object was found in the image (alpha is zero everywhere)."""


class ComplexBackgroundError(ValueError):
  """Strict matting: the background looks too complex for the built-in mattes."""


# The mattes without learned weights, whose result check_matte judges, and
# the check's options for each (grabcut sets defocused clutter aside).
BUILTIN_MATTES = {"builtin": {}, "grabcut": {"only_sharp_edges": True}}
MATTE_ADVICE = ("install rembg (pip install 'vf3d_jax[matting]', then fetch its model once: "
                "rembg d isnet-general-use) or pass an RGBA cut-out")


# --------------------------------------------------------------------------
# Reading.


def load_image(path: str | os.PathLike) -> Image.Image:
  """Opens any image Pillow reads, upright (EXIF orientation applied).

  Args:
    path: an image file.

  Returns:
    The decoded ``PIL.Image`` in its own mode (see ``to_rgba``).

  Raises:
    ImageLoadError: the file is missing or is not a readable image.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ImageLoadError(f"image file not found: {path}")
  if not os.path.isfile(path):
    raise ImageLoadError(f"not a file: {path}")
  try:
    with Image.open(path) as image:
      image.load()  # decode now so truncated files fail here, not later
      upright = ImageOps.exif_transpose(image)
  except Exception as e:  # Pillow raises many kinds for bad files.
    reason = " ".join(str(e).split()) or type(e).__name__
    raise ImageLoadError(f"cannot read image {path}: {reason}") from e
  return upright


def to_rgba(image: Image.Image) -> np.ndarray:
  """Converts a Pillow image of any mode to straight-alpha RGBA.

  Args:
    image: any mode. 16-bit grey (``I;16*``) and 32-bit integer (``I``, how
      Pillow may open 16-bit PNGs) are scaled by ``1/65535``; float (``F``) is
      taken as ``[0, 1]``; palette images keep their transparency; CMYK and
      other colour spaces go through Pillow's conversion to RGB.

  Returns:
    ``[H, W, 4]`` float32 in ``[0, 1]``; alpha is 1 where the image has none.
  """
  mode = image.mode
  if mode.startswith("I;16") or mode in ("I", "F"):
    grey = np.asarray(image).astype(np.float32)
    if mode != "F":
      grey = grey / 65535.0
    grey = np.clip(grey, 0.0, 1.0)
    return np.stack([grey, grey, grey, np.ones_like(grey)], axis=-1)
  if mode == "RGBA":
    rgba = np.asarray(image)
  elif mode in ("P", "PA", "RGBa") or "transparency" in image.info:
    rgba = np.asarray(image.convert("RGBA"))  # palette / colour-key transparency
  elif mode == "RGB":
    rgb = np.asarray(image)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, rgb.dtype)], -1)
  elif mode in ("L", "1"):
    grey = np.asarray(image.convert("L"))
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
  elif mode in ("LA", "La"):
    grey, alpha = np.moveaxis(np.asarray(image.convert("LA")), -1, 0)
    rgba = np.stack([grey, grey, grey, alpha], axis=-1)
  else:  # CMYK, YCbCr, LAB, HSV, ...
    rgba = np.asarray(image.convert("RGB").convert("RGBA"))
  return rgba.astype(np.float32) / 255.0


def has_meaningful_alpha(rgba: np.ndarray) -> bool:
  """Whether an alpha channel says anything: some pixel is not fully opaque."""
  return bool(np.min(rgba[..., 3]) < 1.0)


# --------------------------------------------------------------------------
# Background removal.


def keep_main_components(mask: np.ndarray, min_component_fraction: float) -> np.ndarray:
  """The object's part of a foreground mask, holes filled.

  Keeps the largest 8-connected component reaching the central half of the
  image (else the largest overall) and every such component at least
  ``min_component_fraction`` of its size; an empty mask stays empty.
  """
  height, width = mask.shape
  labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
  if count == 0:
    return mask
  sizes = np.bincount(labels.ravel(), minlength=count + 1)
  sizes[0] = 0
  centre = labels[height // 4:height - height // 4, width // 4:width - width // 4]
  candidates = np.unique(centre[centre > 0])
  if candidates.size == 0:
    candidates = np.arange(1, count + 1)
  main_size = sizes[candidates].max()
  keep = candidates[sizes[candidates] >= min_component_fraction * main_size]
  return ndimage.binary_fill_holes(np.isin(labels, keep))


def remove_background(rgb: np.ndarray,
                      border_fraction: float = 0.02,
                      min_threshold: float = 0.08,
                      noise_factor: float = 3.0,
                      softness: float = 0.08,
                      smoothing_sigma: float = 1.0,
                      min_component_fraction: float = 0.05,
                      feather_sigma: float = 0.6,
                      min_alpha: float = 0.05) -> np.ndarray:
  """Built-in alpha matte for an object in front of a plain background.

  No network and no weights: it assumes what product shots and generated
  images usually show, one object on a near-uniform background that fills
  the image border. Steps and why:

  1. Background colour = per-channel median of a border band
     (``border_fraction`` of the shorter side, at least 1 px): the median
     ignores an object touching up to half of the border.
  2. Distance of each pixel's colour (after a Gaussian blur of
     ``smoothing_sigma`` px, which tames sensor and JPEG noise) from that
     colour. The threshold adapts to the background's noise:
     ``max(min_threshold, noise_factor * median border distance)``; for
     Gaussian noise of std ``s`` per channel the median distance is ~1.5 s,
     so the default sits ~4.5 s out, where false positives are ~1e-4.
  3. A soft ramp of width ``softness`` above the threshold gives anti-aliased
     edges; the hard mask is where the ramp is >= 0.5.
  4. Connected components (8-connected): keep the largest of those reaching
     the central half of the image (the object is usually framed there; if
     none does, the largest overall) plus any other such component at least
     ``min_component_fraction`` of its size, so multi-part objects survive and
     specks do not.
  5. Fill holes: a white label or highlight inside a white-backed object is
     object, not background. (A true see-through hole is filled too; use a
     matting model for such objects.)
  6. Alpha = 1 inside; in a 2 px band around the outline each pixel is
     unmixed as ``a * F + (1 - a) * B`` with ``B`` the background colour and
     ``F`` the colour of the nearest interior pixel (the soft ramp where ``F``
     is too close to ``B``), which puts the 0.5 level on the true edge; values
     within 3 noise sigmas of the background become 0; then an inward
     ``feather_sigma`` px feather (minimum of the matte and its blur, so the
     object never grows). Values below ``min_alpha`` become exactly 0: JPEG
     colour halos would otherwise widen the bounding box that recentring
     uses by a pixel or three.

  Args:
    rgb: ``[H, W, 3]`` float in ``[0, 1]``.
    border_fraction: width of the border band, relative to ``min(H, W)``.
    min_threshold: smallest colour distance (RGB, ``[0, 1]`` units) counted
      as object.
    noise_factor: threshold in units of the border's median distance.
    softness: width of the soft ramp, in colour distance.
    smoothing_sigma: Gaussian blur (px) before measuring distances.
    min_component_fraction: secondary components kept if at least this
      fraction of the main one.
    feather_sigma: inward feather (px); 0 disables it.
    min_alpha: smaller alpha values are set to 0.

  Returns:
    ``[H, W]`` float32 alpha in ``[0, 1]``; all zero if nothing stands out.
  """
  rgb = np.asarray(rgb, np.float32)
  height, width = rgb.shape[:2]
  band = max(1, int(round(border_fraction * min(height, width))))
  border = np.concatenate([
      rgb[:band].reshape(-1, 3), rgb[-band:].reshape(-1, 3),
      rgb[:, :band].reshape(-1, 3), rgb[:, -band:].reshape(-1, 3)])
  background = np.median(border, axis=0)

  if smoothing_sigma > 0:
    smooth = ndimage.gaussian_filter(rgb, (smoothing_sigma, smoothing_sigma, 0),
                                     mode="nearest")
  else:
    smooth = rgb
  distance = np.linalg.norm(smooth - background, axis=-1)
  border_distance = np.linalg.norm(border - background, axis=-1)
  median_distance = float(np.median(border_distance))
  threshold = max(min_threshold, noise_factor * median_distance)
  soft = np.clip((distance - threshold) / softness, 0.0, 1.0)
  mask = soft >= 0.5

  if not mask.any():
    return np.zeros((height, width), np.float32)
  core = keep_main_components(mask, min_component_fraction)

  ring = np.ones((5, 5), bool)  # 2 px each way
  interior = ndimage.binary_erosion(core, ring)
  edge_band = ndimage.binary_dilation(core, ring) & ~interior
  alpha = core.astype(np.float32)
  if interior.any():
    # Unmix edge pixels: p = a * F + (1 - a) * B with F the colour of the
    # nearest interior pixel, so the 0.5 level sits where the edge really is
    # (a distance threshold near the background would bias it outwards).
    nearest = ndimage.distance_transform_edt(~interior, return_distances=False,
                                             return_indices=True)
    rows, cols = nearest[0][edge_band], nearest[1][edge_band]
    object_colour = smooth[rows, cols] - background
    contrast = np.sum(object_colour ** 2, axis=-1)
    unmixed = np.sum((rgb[edge_band] - background) * object_colour, axis=-1) / np.maximum(
        contrast, 1e-12)
    # Background noise alone must not make alpha: drop values within 3 sigma
    # of it (sigma ~ median border distance / 1.54 for Gaussian noise).
    noise_alpha = 3.0 * (median_distance / 1.54) / np.sqrt(np.maximum(contrast, 1e-12))
    unmixed = np.where(unmixed > noise_alpha, unmixed, 0.0)
    # Where the object's colour is close to the background the ratio is noise.
    alpha[edge_band] = np.where(contrast > threshold ** 2, np.clip(unmixed, 0.0, 1.0),
                                soft[edge_band])
  else:
    alpha = np.where(edge_band, soft, alpha).astype(np.float32)
  if feather_sigma > 0:
    # Inward only (the minimum with the blurred matte): softens stair-stepped
    # outlines without growing the object.
    alpha = np.minimum(alpha, ndimage.gaussian_filter(alpha, feather_sigma, mode="constant"))
  alpha[alpha < min_alpha] = 0.0
  return np.clip(alpha, 0.0, 1.0).astype(np.float32)


def grabcut_background(rgb: np.ndarray) -> np.ndarray:
  """The GrabCut matte seeded from a fitted border background
  (``vf3d_jax.inference.matting.grabcut_matte``): for gradients, textures and
  photographic backgrounds, where ``remove_background``'s one colour fails."""
  from vf3d_jax.inference import matting  # pylint: disable=import-outside-toplevel
  return matting.grabcut_matte(rgb)


def no_matting(rgb: np.ndarray) -> np.ndarray:
  """``matting=none``: the whole image is the object (inputs already on white
  and framed; recentring then only pads the image to the foreground ratio)."""
  return np.ones(rgb.shape[:2], np.float32)


# Named matting methods; register external models (e.g. rembg) here.
MATTING_METHODS: dict[str, MattingFn] = {"builtin": remove_background,
                                         "grabcut": grabcut_background,
                                         "none": no_matting}


def register_matting(name: str, matting_fn: MattingFn) -> None:
  """Makes ``matting_fn`` available to ``preprocess_image(matting_fn=name)``.

  Example with rembg (not a dependency of this package)::

    session = rembg.new_session("isnet-general-use")
    def rembg_alpha(rgb):
      image = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
      return np.asarray(rembg.remove(image, session=session, only_mask=True)) / 255
    register_matting("rembg", rembg_alpha)
  """
  MATTING_METHODS[name] = matting_fn


_REMBG_SESSIONS: dict[str, MattingFn] = {}


def _rembg(model: str) -> MattingFn:
  from vf3d_jax.inference import matting  # pylint: disable=import-outside-toplevel
  if model not in _REMBG_SESSIONS:
    _REMBG_SESSIONS[model] = matting.rembg_matting(model)
  return _REMBG_SESSIONS[model]


def _resolve_matting(matting_fn: MattingFn | str | None) -> tuple[MattingFn, str]:
  """A matting function and its name. Besides the registered names:
  ``"rembg"`` / ``"rembg:<model>"`` (rembg with its local model file; a
  missing package or file raises ``RuntimeError`` saying how to get it) and
  ``"auto"`` (rembg's ``isnet-general-use`` when it is installed with its
  model, else ``"grabcut"``, the better of the mattes without weights)."""
  if matting_fn is None:
    matting_fn = "builtin"
  if isinstance(matting_fn, str) and matting_fn not in MATTING_METHODS:
    from vf3d_jax.inference import matting  # pylint: disable=import-outside-toplevel
    if matting_fn == "auto":
      if matting.rembg_available(matting.REMBG_DEFAULT_MODEL)[0]:
        matting_fn = f"rembg:{matting.REMBG_DEFAULT_MODEL}"
      else:
        return MATTING_METHODS["grabcut"], "grabcut"
    if matting_fn == "rembg" or matting_fn.startswith("rembg:"):
      model = matting_fn.partition(":")[2] or matting.REMBG_DEFAULT_MODEL
      return _rembg(model), f"rembg:{model}"
  if isinstance(matting_fn, str):
    if matting_fn not in MATTING_METHODS:
      raise ValueError(f"unknown matting method {matting_fn!r}; registered: "
                       f"{sorted(MATTING_METHODS)}, or auto, rembg, rembg:<model>")
    return MATTING_METHODS[matting_fn], matting_fn
  return matting_fn, getattr(matting_fn, "__name__", "callable")


def _check_alpha(alpha: Any, shape: tuple[int, int], name: str) -> np.ndarray:
  """Validates a matte: ``[H, W]`` (or ``[H, W, 1]``); uint8 means 0..255."""
  alpha = np.asarray(alpha)
  if alpha.ndim == 3 and alpha.shape[-1] == 1:
    alpha = alpha[..., 0]
  if alpha.shape != shape:
    raise ValueError(f"matting {name!r} returned shape {alpha.shape}, expected {shape}")
  if alpha.dtype == np.uint8:
    alpha = alpha / 255.0
  return np.clip(alpha.astype(np.float32), 0.0, 1.0)


# --------------------------------------------------------------------------
# Recentring.


def area_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Taps of an area (box-coverage) resampling of one axis.

  Output pixel ``o`` covers input ``[o * s, (o + 1) * s)`` with
  ``s = in_size / out_size``; each input pixel is a constant cell and weighs
  its overlap with that interval divided by ``s``. This is OpenCV's
  ``INTER_AREA`` both ways: its shrinking tables compute these overlaps
  (skipping overlaps below 1e-3 px), and when enlarging its ``INTER_AREA``
  coefficients ``fx = (o + 1) - (i + 1) / s`` are the same two-cell overlaps.
  OpenCV evaluates those in floating point: where an output boundary lands
  exactly on an input boundary its rounding can wrap ``fx`` and take the
  neighbouring pixel (one output pixel in ~5% of enlarging size pairs); this
  exact version does not.

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    ``(index [out_size, K] int64, weight [out_size, K] float64)``, ``K =
    ceil(s) + 1``; unused taps have weight 0 and a valid index.
  """
  scale = in_size / out_size
  taps = int(math.ceil(scale)) + 1
  start = np.arange(out_size, dtype=np.float64) * scale
  end = start + scale
  index = np.floor(start).astype(np.int64)[:, None] + np.arange(taps)
  overlap = np.minimum(end[:, None], index + 1) - np.maximum(start[:, None], index)
  weight = np.clip(overlap, 0.0, None) / scale
  weight[index >= in_size] = 0.0
  weight /= weight.sum(axis=1, keepdims=True)  # exact partition of unity
  return np.clip(index, 0, in_size - 1), weight


def area_resize(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Area resampling of ``[H, W, ...]`` to ``out_hw`` (OpenCV ``INTER_AREA``).

  Separable and sparse (a handful of taps per output pixel), so large photos
  are cheap. See ``area_weights`` for the exact weights.

  Returns:
    float32 ``[out_h, out_w, ...]``.
  """
  x = np.asarray(x, np.float32)
  for axis, out_size in enumerate(out_hw):
    if x.shape[axis] == out_size:
      continue
    index, weight = area_weights(x.shape[axis], out_size)
    moved = np.moveaxis(x, axis, 0)
    result = np.zeros((out_size,) + moved.shape[1:], np.float32)
    tail = (slice(None),) + (None,) * (moved.ndim - 1)
    for tap in range(index.shape[1]):
      result += weight[:, tap].astype(np.float32)[tail] * moved[index[:, tap]]
    x = np.moveaxis(result, 0, axis)
  return x


def foreground_bbox(alpha: np.ndarray) -> tuple[int, int, int, int]:
  """``(row_min, row_max, col_min, col_max)`` of the nonzero alpha, inclusive."""
  rows = np.flatnonzero(np.any(alpha > ALPHA_NONZERO, axis=1))
  cols = np.flatnonzero(np.any(alpha > ALPHA_NONZERO, axis=0))
  if rows.size == 0:
    raise EmptyForegroundError("no foreground: alpha is zero everywhere")
  return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def recenter(rgba: np.ndarray, foreground_ratio: float = 0.8
             ) -> tuple[np.ndarray, dict[str, Any]]:
  """Places the object centred on a square canvas, as upstream does.

  With the inclusive bounding box ``[r0, r1] x [c0, c1]`` of nonzero alpha,
  ``h = r1 - r0`` and ``w = c1 - c0`` (one less than the extent: upstream's
  convention, kept because the model was trained on it), side ``S = max(H,
  W)``, ``scale = int(S * ratio) / max(h, w)``: the crop ``rgba[r0:r1,
  c0:c1]`` (last row and column excluded, as upstream) is area-resized to
  ``(int(h * scale), int(w * scale))`` and pasted at ``((S - h2) // 2, (S -
  w2) // 2)``; the rest of the canvas is transparent.

  Args:
    rgba: ``[H, W, 4]`` straight alpha.
    foreground_ratio: target longer side of the object over the canvas side
      (upstream ``1 - border_ratio`` = 0.8).

  Returns:
    ``(canvas [S, S, 4] float32 premultiplied-by-alpha colour, info)`` where
    ``info`` holds ``bbox``, ``canvas_size``, ``scale`` and ``placed_box``
    ``(row, col, h2, w2)``.

  Raises:
    EmptyForegroundError: alpha is zero everywhere, or the object is a
      single row or column.
  """
  height, width = rgba.shape[:2]
  size = max(height, width)
  r0, r1, c0, c1 = foreground_bbox(rgba[..., 3])
  h, w = r1 - r0, c1 - c0
  if h == 0 or w == 0:
    raise EmptyForegroundError(
        f"foreground too thin to recentre: bounding box rows {r0}..{r1}, cols {c0}..{c1}")
  desired = int(size * foreground_ratio)
  scale = desired / max(h, w)
  h2, w2 = int(h * scale), int(w * scale)
  top, left = (size - h2) // 2, (size - w2) // 2
  crop = rgba[r0:r1, c0:c1].astype(np.float32)
  premultiplied = np.concatenate([crop[..., :3] * crop[..., 3:], crop[..., 3:]], -1)
  canvas = np.zeros((size, size, 4), np.float32)
  canvas[top:top + h2, left:left + w2] = area_resize(premultiplied, (h2, w2))
  info = {"bbox": (r0, r1, c0, c1), "canvas_size": size, "scale": scale,
          "placed_box": (top, left, h2, w2)}
  return canvas, info


def composite_on_white(premultiplied_rgba: np.ndarray) -> np.ndarray:
  """``rgb * a + (1 - a)`` for premultiplied input: ``[..., 4] -> [..., 3]``."""
  alpha = premultiplied_rgba[..., 3:]
  return np.clip(premultiplied_rgba[..., :3] + (1.0 - alpha), 0.0, 1.0)


def resize_to_model_input(rgb: np.ndarray, size: int) -> np.ndarray:
  """PyTorch bicubic (``align_corners=True``) to ``size x size``, clamped.

  Args:
    rgb: ``[S, S, 3]`` float in ``[0, 1]``.
    size: output side.

  Returns:
    ``[size, size, 3]`` float32 in ``[0, 1]``.
  """
  resized = resize_bicubic(jnp.asarray(rgb, jnp.float32), (size, size), align_corners=True)
  return np.asarray(jnp.clip(resized, 0.0, 1.0), np.float32)


# --------------------------------------------------------------------------
# The whole pipeline.


def _downscaled_size(height: int, width: int, max_side: int | None) -> tuple[int, int] | None:
  """``(h, w)`` with the longer side ``max_side`` (each at least 1), or None if it fits."""
  if max_side is None or max(height, width) <= max_side:
    return None
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def downscale_image(image: Image.Image, max_side: int | None = MAX_SIDE) -> Image.Image:
  """Area-downscales (Pillow ``BOX``) so the longer side is at most ``max_side``.

  Works on the decoded 8-bit (or 32-bit) data, before ``to_rgba`` makes it
  float32. Modes Pillow cannot area-resize become the ones ``to_rgba`` maps
  them to anyway (palette and colour-key transparency -> RGBA, ``1`` -> L,
  16-bit -> I, CMYK and other colour spaces -> RGB); RGBA and LA are
  resized premultiplied by Pillow, so hidden colour does not bleed.
  """
  size = _downscaled_size(image.height, image.width, max_side)
  if size is None:
    return image
  if image.mode in ("P", "PA") or "transparency" in image.info:
    image = image.convert("RGBA")
  elif image.mode == "1":
    image = image.convert("L")
  elif image.mode.startswith("I;16"):
    image = image.convert("I")
  elif image.mode not in ("RGB", "RGBA", "RGBa", "L", "LA", "La", "I", "F"):
    image = image.convert("RGB")
  return image.resize((size[1], size[0]), Image.BOX)


def _downscale_array(rgba: np.ndarray, max_side: int | None) -> np.ndarray:
  """``downscale_image`` for float straight-alpha ``[H, W, 4]`` (premultiplied area resize)."""
  size = _downscaled_size(*rgba.shape[:2], max_side)
  if size is None:
    return rgba
  alpha = rgba[..., 3:]
  small = area_resize(np.concatenate([rgba[..., :3] * alpha, alpha], -1), size)
  colour = np.where(small[..., 3:] > 0, small[..., :3] / np.maximum(small[..., 3:], 1e-12), 0.0)
  return np.concatenate([np.clip(colour, 0.0, 1.0), small[..., 3:]], -1).astype(np.float32)


def load_rgba(image: ImageInput, max_side: int | None = MAX_SIDE
              ) -> tuple[np.ndarray, tuple[int, int], str]:
  """Any accepted input as straight-alpha RGBA, downscaled to ``max_side``.

  Args:
    image: a path, a ``PIL.Image`` or an array (see ``preprocess_image``).
    max_side: longest side of the result (None: keep the input's size).

  Returns:
    ``(rgba [H', W', 4] float32 in [0, 1], (H, W) of the input, a name for
    messages)``.

  Raises:
    ImageLoadError: unreadable input file.
    ValueError: an array of another shape.
  """
  if isinstance(image, (str, os.PathLike)):
    upright, source = load_image(image), os.fspath(image)
  elif isinstance(image, Image.Image):
    upright, source = ImageOps.exif_transpose(image), "<PIL image>"
  else:
    upright = None
  if upright is not None:
    return to_rgba(downscale_image(upright, max_side)), (upright.height, upright.width), source
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an [H, W], [H, W, 3] or [H, W, 4] array, got {array.shape}")
  if array.dtype == np.uint8:
    array = array / 255.0
  elif array.dtype == np.uint16:
    array = array / 65535.0
  array = np.clip(array.astype(np.float32), 0.0, 1.0)
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  if array.shape[-1] == 3:
    array = np.concatenate([array, np.ones_like(array[..., :1])], -1)
  return _downscale_array(array, max_side), array.shape[:2], "<array>"


def preprocess_image(image: ImageInput, size: int = 512,
                     foreground_ratio: float = 0.8,
                     matting_fn: MattingFn | str | None = None,
                     max_side: int | None = MAX_SIDE,
                     strict: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
  """Turns a photo or cut-out into the model's input image.

  Args:
    image: a path, a ``PIL.Image`` or an array (``uint8``, ``uint16`` or float
      in ``[0, 1]``; ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``).
    size: output side (the released model: 512).
    foreground_ratio: object's longer side over the image side (0.8).
    matting_fn: for opaque images, a callable ``rgb [H, W, 3] -> alpha [H,
      W]`` or a name in ``MATTING_METHODS``; ``None`` uses the built-in
      ``remove_background``. Images with meaningful alpha keep theirs.
    max_side: a larger input is area-downscaled to this longer side first
      (``MAX_SIDE``; None: never).
    strict: refuse (``ComplexBackgroundError``) instead of warning when a
      built-in matte's ``check_matte`` finds the background too complex.

  Returns:
    ``(image [size, size, 3] float32 in [0, 1], info)``; ``info`` holds
    ``input_size`` ``(H, W)``, ``working_size`` ``(H', W')`` (after the
    downscale), ``alpha_source`` (``"image"`` or the matting method's name),
    ``alpha`` (``[H', W']`` float32, the matte used), ``matte_warning``
    (``None``, or why a built-in matte is likely wrong, and what to do) and
    the geometry from ``recenter`` (in working pixels).

  Raises:
    ImageLoadError: unreadable input file.
    EmptyForegroundError: no object found.
    ComplexBackgroundError: ``strict`` and a built-in matte failed its check.
  """
  rgba, input_size, source = load_rgba(image, max_side)
  warning = None
  if has_meaningful_alpha(rgba):
    alpha_source = "image"
  else:
    method, alpha_source = _resolve_matting(matting_fn)
    alpha = _check_alpha(method(rgba[..., :3].copy()), rgba.shape[:2], alpha_source)
    rgba = np.concatenate([rgba[..., :3], alpha[..., None]], -1)
    if alpha_source in BUILTIN_MATTES and np.any(alpha > 0.5):
      from vf3d_jax.inference import matting  # pylint: disable=import-outside-toplevel
      check = matting.check_matte(rgba[..., :3], alpha, **BUILTIN_MATTES[alpha_source])
      if check.too_complex:
        warning = (f"the background looks too complex for the {alpha_source} matte "
                   f"({check.reason()}); {MATTE_ADVICE}")
        if strict:
          raise ComplexBackgroundError(f"{source}: {warning} (preprocess.strict refuses it)")
  if not np.any(rgba[..., 3] > ALPHA_NONZERO):
    hint = ("its alpha channel is zero everywhere" if alpha_source == "image" else
            f"matting {alpha_source!r} found no object; pass an RGBA cut-out or another matting_fn")
    raise EmptyForegroundError(f"no foreground in {source}: {hint}")
  try:
    canvas, info = recenter(rgba, foreground_ratio)
  except EmptyForegroundError as e:
    raise EmptyForegroundError(f"{source}: {e}") from e
  result = resize_to_model_input(composite_on_white(canvas), size)
  info.update(input_size=input_size, working_size=rgba.shape[:2], alpha_source=alpha_source,
              alpha=rgba[..., 3], matte_warning=warning)
  return result, info
