"""Tests of the input image preparation."""

import fractions
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vf3d_jax.inference import preprocess
from vf3d_jax.inference.preprocess import (EmptyForegroundError, ImageLoadError, area_resize,
                                           load_image, preprocess_image, recenter,
                                           remove_background, to_rgba)

SIZE = 512
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ellipse_mask(height, width, centre, radii):
  rows, cols = np.mgrid[:height, :width]
  return (((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2) <= 1.0


def _object_extent(mask):
  rows = np.flatnonzero(mask.any(1))
  cols = np.flatnonzero(mask.any(0))
  return rows[0], rows[-1], cols[0], cols[-1]


def _scene(height, width):
  """An off-centre ellipse, its colour varying, as uint8 RGB + bool mask."""
  mask = _ellipse_mask(height, width, (0.4 * height, 0.6 * width),
                       (0.25 * height, 0.18 * width))
  rows, cols = np.mgrid[:height, :width]
  rgb = np.full((height, width, 3), 255, np.uint8)
  colour = np.stack([150 + 60 * rows / height, 30 + 40 * cols / width,
                     np.full(rows.shape, 40.0)], -1).astype(np.uint8)
  rgb[mask] = colour[mask]
  return rgb, mask


def _write(kind, path):
  """Writes one test image of ``kind``; returns its (height, width) as displayed."""
  if kind == "tiny":
    rgb, _ = _scene(12, 9)
    Image.fromarray(rgb).save(path)
    return 12, 9
  if kind == "large":
    rgb, _ = _scene(1200, 1600)
    noise = np.random.default_rng(0).normal(0, 3, rgb.shape)
    Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
    return 1200, 1600
  height, width = 240, 320  # non-square
  rgb, mask = _scene(height, width)
  if kind == "rgb":
    Image.fromarray(rgb).save(path)
  elif kind == "rgba":
    alpha = np.where(mask, 255, 0).astype(np.uint8)
    hidden = np.where(mask[..., None], rgb, 0).astype(np.uint8)  # black under alpha 0
    Image.fromarray(np.dstack([hidden, alpha])).save(path)
  elif kind == "la":
    grey = np.where(mask, 60, 0).astype(np.uint8)
    Image.fromarray(np.dstack([grey, np.where(mask, 255, 0).astype(np.uint8)]), "LA").save(path)
  elif kind == "l":
    Image.fromarray(np.where(mask, 70, 250).astype(np.uint8), "L").save(path)
  elif kind == "p_transparent":
    image = Image.fromarray(mask.astype(np.uint8), "P")
    image.putpalette([0, 255, 0, 200, 30, 40] + [0] * 762)
    image.save(path, transparency=0)  # index 0 (green) is transparent
  elif kind == "i16":
    Image.fromarray(np.where(mask, 9000, 65535).astype(np.uint16)).save(path)
  elif kind == "cmyk":
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
  elif kind == "exif_rotated":
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    return width, height
  else:
    raise ValueError(kind)
  return height, width


KINDS = {"rgb": "png", "rgba": "png", "la": "png", "l": "png", "p_transparent": "png",
         "i16": "png", "cmyk": "jpg", "exif_rotated": "jpg", "tiny": "png", "large": "jpg"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_image_kind_is_centred_at_the_ratio(kind, tmp_path):
  path = tmp_path / f"{kind}.{KINDS[kind]}"
  height, width = _write(kind, path)
  image, info = preprocess_image(path)
  assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
  assert image.min() >= 0.0 and image.max() <= 1.0
  assert info["input_size"] == (height, width)
  assert info["alpha_source"] == ("image" if kind in ("rgba", "la", "p_transparent")
                                  else "builtin")
  side = max(height, width)
  step = (SIZE - 1) / (side - 1)  # output px per canvas px (align_corners)
  r0, r1, c0, c1 = _object_extent(image.min(-1) < 0.9)
  expected = int(0.8 * side) * step
  tolerance = 3 + 1.5 * step
  assert abs(max(r1 - r0, c1 - c0) + 1 - expected) <= tolerance, (r0, r1, c0, c1, expected)
  assert abs((r0 + r1) / 2 - (SIZE - 1) / 2) <= 1 + step
  assert abs((c0 + c1) / 2 - (SIZE - 1) / 2) <= 1 + step
  # The object's aspect survives: tall ellipse (0.5 H by 0.36 W) -> taller than wide,
  # except the rotated one.
  tall = (r1 - r0) > (c1 - c0)
  assert tall == (kind != "exif_rotated") or kind == "tiny"


def test_load_image_errors(tmp_path):
  with pytest.raises(ImageLoadError, match="not found.*missing.png"):
    load_image(tmp_path / "missing.png")
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image at all")
  with pytest.raises(ValueError, match="cannot read image .*bad.png"):
    load_image(bad)
  truncated = tmp_path / "truncated.png"
  Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:60])
  with pytest.raises(ImageLoadError, match="truncated.png"):
    load_image(truncated)
  with pytest.raises(ImageLoadError, match="not a file"):
    load_image(tmp_path)


def test_exif_orientation_is_applied(tmp_path):
  stored = np.full((20, 40, 3), 255, np.uint8)
  stored[:8, :8] = (255, 0, 0)  # marker at the stored top-left
  exif = Image.Exif()
  exif[0x0112] = 6
  path = tmp_path / "rotated.jpg"
  Image.fromarray(stored).save(path, exif=exif, quality=98)
  shown = np.asarray(load_image(path).convert("RGB")).astype(int)
  assert shown.shape == (40, 20, 3)
  # Rotating 90 degrees clockwise takes the top-left corner to the top-right.
  assert shown[2, -3, 0] > 200 and shown[2, -3, 1] < 60
  assert shown[2, 2, 1] > 200


def test_to_rgba_modes():
  grey16 = Image.fromarray(np.array([[0, 32768, 65535]], np.uint16))
  assert grey16.mode.startswith("I;16")
  np.testing.assert_allclose(to_rgba(grey16)[0, :, 0], [0, 32768 / 65535, 1], atol=1e-6)
  np.testing.assert_allclose(to_rgba(grey16.convert("I"))[0, :, 1], [0, 32768 / 65535, 1],
                             atol=1e-6)
  la = Image.fromarray(np.array([[[10, 0], [200, 128]]], np.uint8), "LA")
  np.testing.assert_allclose(to_rgba(la)[0] * 255, [[10, 10, 10, 0], [200, 200, 200, 128]],
                             atol=1e-4)
  palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
  palette.putpalette([1, 2, 3, 90, 80, 70] + [0] * 762)
  palette.info["transparency"] = 0
  np.testing.assert_allclose(to_rgba(palette)[0] * 255, [[1, 2, 3, 0], [90, 80, 70, 255]],
                             atol=1e-4)
  cmyk = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)).convert("CMYK")
  np.testing.assert_allclose(to_rgba(cmyk)[0, :, :3], [[1, 0, 0], [0, 0, 1]], atol=1e-6)
  for mode in ("L", "1", "RGB", "YCbCr"):
    rgba = to_rgba(Image.new("RGB", (3, 2), "white").convert(mode))
    assert rgba.shape == (2, 3, 4) and rgba.dtype == np.float32
    np.testing.assert_allclose(rgba, 1.0, atol=2e-2)  # YCbCr white is ~254


def test_builtin_matting_recovers_a_disc():
  rng = np.random.default_rng(1)
  mask = _ellipse_mask(200, 260, (90, 140), (55, 55))
  rgb = np.full((200, 260, 3), 0.96, np.float32) + rng.normal(0, 0.02, (200, 260, 3))
  rgb[mask] = (0.2, 0.5, 0.8)
  rgb[_ellipse_mask(200, 260, (90, 140), (10, 10))] = 0.96  # a white highlight inside
  rgb[_ellipse_mask(200, 260, (20, 20), (2, 2))] = 0.1  # a speck away from the object
  alpha = remove_background(np.clip(rgb, 0, 1))
  assert alpha.shape == mask.shape and alpha.dtype == np.float32
  found = alpha > 0.5
  iou = (found & mask).sum() / (found | mask).sum()
  assert iou > 0.95, iou
  assert alpha[15:26, 15:26].max() == 0.0  # the speck is gone
  assert alpha[90, 140] == 1.0  # the highlight was filled
  r0, r1, c0, c1 = _object_extent(alpha > 0)
  m0, m1, n0, n1 = _object_extent(mask)
  assert max(abs(r0 - m0), abs(r1 - m1), abs(c0 - n0), abs(c1 - n1)) <= 2


def test_matting_hook_and_alpha_rules():
  rgb, mask = _scene(60, 80)
  calls = []

  def from_red(colour):
    calls.append(colour.shape)
    return (colour[..., 1] < 0.9).astype(np.float32)

  _, info = preprocess_image(rgb, size=64, matting_fn=from_red)
  assert calls == [(60, 80, 3)] and info["alpha_source"] == "from_red"
  np.testing.assert_array_equal(info["alpha"], mask)

  preprocess.register_matting("test_red", from_red)
  try:
    _, info = preprocess_image(rgb, size=64, matting_fn="test_red")
    assert info["alpha_source"] == "test_red" and len(calls) == 2
  finally:
    del preprocess.MATTING_METHODS["test_red"]
  with pytest.raises(ValueError, match="unknown matting"):
    preprocess_image(rgb, size=64, matting_fn="no_such_method")

  # An all-opaque alpha counts as none: the matte runs.
  opaque = np.dstack([rgb, np.full(mask.shape, 255, np.uint8)])
  _, info = preprocess_image(opaque, size=64, matting_fn=from_red)
  assert len(calls) == 3 and info["alpha_source"] == "from_red"

  # A meaningful alpha is used as is, and the matte is not called.
  cut_out = np.dstack([rgb, np.where(mask, 255, 0).astype(np.uint8)])
  _, info = preprocess_image(cut_out, size=64, matting_fn=from_red)
  assert len(calls) == 3 and info["alpha_source"] == "image"


def test_empty_foreground_is_an_error(tmp_path):
  path = tmp_path / "clear.png"
  Image.new("RGBA", (30, 20), (255, 0, 0, 0)).save(path)
  with pytest.raises(EmptyForegroundError, match="clear.png.*zero everywhere"):
    preprocess_image(path)
  with pytest.raises(EmptyForegroundError, match="found no object"):
    preprocess_image(np.full((30, 20, 3), 0.9, np.float32))


def _hand_made_rgba():
  """100 x 60 RGBA; opaque object rows 10..50, cols 5..25 (inclusive)."""
  rng = np.random.default_rng(3)
  rgba = np.zeros((100, 60, 4), np.float32)
  rgba[..., :3] = rng.uniform(size=(100, 60, 3))  # hidden colour under alpha 0
  rgba[10:51, 5:26, 3] = 1.0
  return rgba


def test_recenter_matches_hand_computation():
  # bbox rows 10..50 -> h = 40, cols 5..25 -> w = 20; canvas 100, desired 80:
  # scale 2, crop rows 10..49 / cols 5..24 enlarged 2x (area = replication),
  # placed at ((100 - 80) // 2, (100 - 40) // 2) = (10, 30).
  rgba = _hand_made_rgba()
  canvas, info = recenter(rgba, 0.8)
  assert info["bbox"] == (10, 50, 5, 25) and info["canvas_size"] == 100
  assert info["scale"] == 2.0 and info["placed_box"] == (10, 30, 80, 40)
  expected = np.zeros((100, 100, 4), np.float32)
  crop = rgba[10:50, 5:25]
  expected[10:90, 30:70] = np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1)
  np.testing.assert_allclose(canvas, expected, atol=1e-6)

  # Shrinking by 2 averages 2x2 blocks of premultiplied colour: ratio 0.25 of a
  # 200 canvas = 50 = 100 / 2 for bbox rows 50..150.
  rgba = np.zeros((200, 160, 4), np.float32)
  rgba[50:151, 30:111] = np.random.default_rng(4).uniform(size=(101, 81, 4))
  rgba[50:151, 30:111, 3] = np.where(np.arange(81) % 3 == 1, 0.0, 0.7)  # partial alpha
  canvas, info = recenter(rgba, 0.25)
  assert info["placed_box"] == (75, 80, 50, 40)
  crop = rgba[50:150, 30:110]
  premultiplied = np.concatenate([crop[..., :3] * crop[..., 3:], crop[..., 3:]], -1)
  blocks = premultiplied.reshape(50, 2, 40, 2, 4).mean(axis=(1, 3))
  np.testing.assert_allclose(canvas[75:125, 80:120], blocks, atol=1e-6)
  assert canvas[:75].max() == 0 and canvas[125:].max() == 0


def _opencv_area_matrix(in_size, out_size):
  """[out, in] weights written after OpenCV's resize code for INTER_AREA."""
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size))
  if scale >= 1:  # computeResizeAreaTab (shrinking)
    for dx in range(out_size):
      fsx1 = dx * scale
      fsx2 = fsx1 + scale
      cell = min(scale, in_size - fsx1)
      sx2 = min(math.floor(fsx2), in_size - 1)
      sx1 = min(math.ceil(fsx1), sx2)
      if sx1 - fsx1 > 1e-3:
        weights[dx, sx1 - 1] += (sx1 - fsx1) / cell
      for sx in range(sx1, sx2):
        weights[dx, sx] += 1 / cell
      if fsx2 - sx2 > 1e-3:
        weights[dx, sx2] += min(min(fsx2 - sx2, 1.0), cell) / cell
  else:  # linear path with INTER_AREA coefficients (enlarging)
    # Exact rationals: OpenCV's doubles can wrap fx from ~1 to ~0 when an
    # output boundary lands exactly on an input one (dx * in / out integral),
    # then taking the neighbouring pixel; that rounding artefact is not copied.
    inverse = fractions.Fraction(out_size, in_size)
    for dx in range(out_size):
      sx = dx * in_size // out_size
      fx = (dx + 1) - (sx + 1) * inverse
      fx = 0.0 if fx <= 0 else float(fx - math.floor(fx))
      weights[dx, min(sx, in_size - 1)] += 1 - fx
      weights[dx, min(sx + 1, in_size - 1)] += fx
  return weights


@pytest.mark.parametrize("in_hw,out_hw", [((37, 29), (16, 12)), ((100, 73), (33, 24)),
                                          ((64, 48), (32, 24)), ((16, 11), (37, 25)),
                                          ((10, 7), (23, 16)), ((300, 200), (257, 171))])
def test_area_resize_matches_opencv_formulas(in_hw, out_hw):
  x = np.random.default_rng(5).uniform(size=in_hw + (4,)).astype(np.float32)
  rows = _opencv_area_matrix(in_hw[0], out_hw[0])
  cols = _opencv_area_matrix(in_hw[1], out_hw[1])
  expected = np.einsum("oi,ijc,pj->opc", rows, x, cols, optimize=True)
  # The reference skips overlaps under 1e-3 px as OpenCV does; none occur here.
  np.testing.assert_allclose(area_resize(x, out_hw), expected, atol=1e-5, rtol=0)


def test_final_resize_matches_torch():
  torch = pytest.importorskip("torch")
  canvas = np.random.default_rng(6).uniform(size=(300, 300, 3)).astype(np.float32)
  ours = preprocess.resize_to_model_input(canvas, SIZE)
  reference = torch.nn.functional.interpolate(
      torch.from_numpy(canvas).permute(2, 0, 1)[None], size=(SIZE, SIZE), mode="bicubic",
      align_corners=True).clamp(0, 1)[0].permute(1, 2, 0).numpy()
  # PyTorch computes source coordinates in float32 (dst * 299/511), which moves
  # its cubic weights by ~1e-5 on a 300 px canvas; the JAX weights are float64
  # and agree with a float64 evaluation of the same formula to 2e-7.
  np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_whole_pipeline_matches_hand_made_reference():
  torch = pytest.importorskip("torch")
  rgba = _hand_made_rgba()
  image, _ = preprocess_image(rgba, size=SIZE)
  canvas = np.ones((100, 100, 3), np.float32)  # white where nothing was placed
  canvas[10:90, 30:70] = np.repeat(np.repeat(rgba[10:50, 5:25, :3], 2, axis=0), 2, axis=1)
  reference = torch.nn.functional.interpolate(
      torch.from_numpy(canvas).permute(2, 0, 1)[None], size=(SIZE, SIZE), mode="bicubic",
      align_corners=True).clamp(0, 1)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(image, reference, atol=1e-4)  # see the test above


_PEAK_MEMORY = """
import resource, sys
import numpy as np
from vf3d_jax.inference import preprocess
preprocess.preprocess_image(np.ones((8, 8, 3), np.float32) * 0.5 + np.eye(8)[..., None] * 0.4,
                            size=64)  # imports, compilation: the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image, info = preprocess.preprocess_image(sys.argv[1], size=64)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, info["working_size"])
"""


def test_a_long_strip_is_downscaled_before_the_square_canvas(tmp_path):
  # 8000 x 40: a max(H, W)^2 float32 RGBA canvas and its copies would peak at
  # ~1.6 GB over the baseline (measured); downscaled to 2048 x 10 it is ~0.2 GB.
  rgba = np.zeros((40, 8000, 4), np.uint8)
  rgba[10:30, 800:7200] = (200, 30, 30, 255)
  path = tmp_path / "strip.png"
  Image.fromarray(rgba).save(path)
  done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(path)], capture_output=True,
                        text=True, timeout=300, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  grown_kb, working = done.stdout.split(maxsplit=1)
  assert working.strip() == "(10, 2048)"
  assert int(grown_kb) < 400 * 1024, f"peak RSS grew by {int(grown_kb) // 1024} MB"


def _square_scene(mode, side):
  """A 1:2 image of ``mode`` with a centred red square on white, built at ``side`` x 2 ``side``.

  Where there is alpha, it is the square and hidden green fills the rest.
  """
  inside = np.zeros((side, 2 * side), bool)
  inside[side // 4:3 * side // 4, 3 * side // 4:5 * side // 4] = True
  rgb = np.where(inside[..., None], (200, 30, 30), (255, 255, 255)).astype(np.uint8)
  hidden = np.where(inside[..., None], rgb, (0, 255, 0)).astype(np.uint8)
  alpha = np.where(inside, 255, 0).astype(np.uint8)
  if mode == "array":
    return np.dstack([hidden, alpha])
  if mode in ("P", "P_transparent"):
    index = np.where(inside, 1, 2 if mode == "P_transparent" else 0).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([255, 255, 255, 200, 30, 30, 0, 255, 0] + [0] * 759)
    if mode == "P_transparent":
      image.info["transparency"] = 2
    return image
  if mode in ("RGBA", "LA"):
    return Image.fromarray(np.dstack([hidden, alpha])).convert(mode)
  if mode == "I;16":
    return Image.fromarray(rgb[..., 1].astype(np.uint16) * 257)
  if mode == "1":
    return Image.fromarray(rgb).convert("L").convert("1", dither=Image.Dither.NONE)
  return Image.fromarray(rgb).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "P_transparent", "1", "I;16",
                                  "CMYK", "array"])
def test_large_images_are_area_downscaled_to_max_side(mode):
  # 60 x 120 with max_side 40: a downscale by 3, and the square's edges sit on
  # 3-pixel block boundaries, so the area downscale equals building the
  # picture at 20 x 40 directly.
  matte = lambda colour: colour.mean(-1) < 0.5
  out, info = preprocess_image(_square_scene(mode, 60), size=32, max_side=40, matting_fn=matte)
  assert info["input_size"] == (60, 120)
  assert info["working_size"] == (20, 40) and info["alpha"].shape == (20, 40)
  expected, _ = preprocess_image(_square_scene(mode, 20), size=32, max_side=None,
                                 matting_fn=matte)
  np.testing.assert_allclose(out, expected, atol=1.5 / 255)  # 8-bit averaging in Pillow


def test_images_within_max_side_are_untouched():
  image = Image.fromarray(np.random.default_rng(8).integers(0, 255, (30, 50, 4), np.uint8))
  assert preprocess.downscale_image(image, 50) is image
  assert preprocess.downscale_image(image, None) is image
  assert preprocess.downscale_image(image, 10).size == (10, 6)
  # A strip keeps at least one pixel across.
  assert preprocess.downscale_image(Image.new("RGB", (6000, 2)), 2048).size == (2048, 1)
