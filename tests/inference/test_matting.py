"""The GrabCut matte and the matting benchmark it is measured on."""

import numpy as np
import pytest

from vf3d_jax.evaluation import matting as matting_benchmark
from vf3d_jax.inference import matting, preprocess


@pytest.fixture(scope="module")
def cases():
  # Two cases of every background (10), with centred and off-centre objects.
  return matting_benchmark.make_cases(10, size=128, object_size=80, seed=0)


def test_cases_have_exact_alpha_and_every_background(cases):
  assert sorted({c["background"] for c in cases}) == sorted(matting_benchmark.BACKGROUNDS)
  for case in cases:
    assert case["rgb"].shape == (128, 128, 3) and case["alpha"].shape == (128, 128)
    fraction = float((case["alpha"] > 0.5).mean())
    assert 0.02 < fraction < 0.5, fraction


def test_border_placement_cuts_the_object():
  rng = np.random.default_rng(0)
  foreground = np.zeros((40, 40, 4), np.float32)
  foreground[10:30, 10:30, 3] = 1.0
  canvas = matting_benchmark.place(foreground, 64, "border", rng)
  alpha = canvas[..., 3] > 0.5
  edges = alpha[0].any() or alpha[-1].any() or alpha[:, 0].any() or alpha[:, -1].any()
  assert edges and 0 < alpha.sum() < 400


def test_background_estimate_follows_a_gradient():
  yy, xx = np.mgrid[0:64, 0:64] / 63.0
  rgb = np.stack([xx, yy, 0.5 * (xx + yy)], -1).astype(np.float32)
  background, residual = matting.background_estimate(rgb)
  np.testing.assert_allclose(background, rgb, atol=1e-4)
  assert residual.max() < 1e-4


def test_grabcut_beats_the_border_colour_matte(cases):
  border = matting_benchmark.score(preprocess.remove_background, cases)
  grabcut = matting_benchmark.score(preprocess.MATTING_METHODS["grabcut"], cases)
  # One colour cannot describe a gradient or a photographic backdrop.
  assert border["background/gradient"] < 0.3
  for kind in ("plain", "gradient", "photo"):
    assert grabcut[f"background/{kind}"] > 0.9, (kind, grabcut)
  assert grabcut["mean_iou"] > border["mean_iou"] + 0.25, (border, grabcut)


def _disc_scene(clutter: bool = False, faint: bool = False, size: int = 96):
  """A red disc on a grey gradient; optionally with other shapes crossing the border, or
  nearly the background's colour in noise."""
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  rgb = np.stack([0.6 + 0.2 * xx, 0.6 + 0.2 * yy, 0.7 * np.ones_like(xx)], -1)
  disc = (yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.2 ** 2
  rgb[disc] = (0.68, 0.7, 0.7) if faint else (0.8, 0.1, 0.1)
  if clutter:
    rgb[0:30, 5:25] = (0.1, 0.3, 0.9)
    rgb[70:96, 60:90] = (0.1, 0.8, 0.2)
    rgb[40:60, 80:96] = (0.9, 0.9, 0.1)
  if faint:
    rgb += np.random.default_rng(0).normal(0, 0.03, rgb.shape)
  return np.clip(rgb, 0, 1).astype(np.float32), disc


def test_check_passes_clean_scenes_and_flags_clutter_and_faint_objects():
  rgb, disc = _disc_scene()
  check = matting.check_matte(rgb, matting.grabcut_matte(rgb))
  assert not check.too_complex and check.reason() == "none", check
  assert check.border_edges == 0.0 and check.confidence > 0.8
  rgb, _ = _disc_scene(clutter=True)
  check = matting.check_matte(rgb, disc.astype(np.float32))  # even given the right matte
  assert check.too_complex and "cross the image border" in check.reason(), check
  rgb, _ = _disc_scene(faint=True)
  check = matting.check_matte(rgb, disc.astype(np.float32))
  assert check.too_complex and "stands out little" in check.reason(), check


def test_check_warns_of_the_failures_on_the_benchmark():
  cases = matting_benchmark.make_cases(20, size=128, object_size=80, seed=5)
  # The border-colour matte fails often; the check catches most of it.
  result = matting_benchmark.score(preprocess.MATTING_METHODS["builtin"], cases, check=True,
                                   check_options=preprocess.BUILTIN_MATTES["builtin"])
  caught, failures = map(int, result["failures_warned"].split("/"))
  false_alarms, good = map(int, result["good_warned"].split("/"))
  assert failures >= 3 and caught >= failures / 2, result
  assert false_alarms <= good / 5, result
  assert result["unwarned_mean_iou"] > result["mean_iou"] + 0.05, result
  # GrabCut fails rarely, and mostly by a few pixels of edge; the check warns of
  # every gross failure and seldom of a good matte.
  result = matting_benchmark.score(preprocess.MATTING_METHODS["grabcut"], cases, check=True,
                                   check_options=preprocess.BUILTIN_MATTES["grabcut"])
  false_alarms, good = map(int, result["good_warned"].split("/"))
  gross = np.asarray(result["per_case"]) < 0.7
  assert gross.any() and np.all(np.asarray(result["per_case_warned"])[gross]), result
  assert false_alarms <= good / 5, result
  assert result["unwarned_mean_iou"] >= result["mean_iou"], result


def test_preprocess_warns_or_refuses_on_a_complex_background():
  rgb, _ = _disc_scene(clutter=True)
  _, info = preprocess.preprocess_image(rgb, size=32, matting_fn="grabcut")
  assert "too complex for the grabcut matte" in info["matte_warning"]
  assert "rembg" in info["matte_warning"] and "RGBA" in info["matte_warning"]
  with pytest.raises(preprocess.ComplexBackgroundError, match="strict refuses"):
    preprocess.preprocess_image(rgb, size=32, matting_fn="grabcut", strict=True)
  # A clean scene, and mattes that are not built-in, pass without a word.
  clean, _ = _disc_scene()
  assert preprocess.preprocess_image(clean, size=32, matting_fn="grabcut",
                                     strict=True)[1]["matte_warning"] is None
  assert preprocess.preprocess_image(rgb, size=32, matting_fn="none",
                                     strict=True)[1]["matte_warning"] is None


def test_rembg_never_downloads_and_says_how_to_get_the_model(tmp_path, monkeypatch):
  monkeypatch.setenv("U2NET_HOME", str(tmp_path))
  ok, reason = matting.rembg_available("isnet-general-use")
  assert not ok
  assert ("not installed" in reason) or (str(tmp_path) in reason and "rembg d" in reason)
  with pytest.raises(RuntimeError):
    matting.rembg_matting("isnet-general-use")


def test_matting_none_keeps_the_whole_image_as_the_object():
  rgb = np.full((40, 40, 3), 1.0, np.float32)
  rgb[5:15, 5:15] = (0.9, 0.1, 0.1)  # off-centre: 'none' must not recentre on it
  image, info = preprocess.preprocess_image(rgb, size=40, matting_fn="none")
  assert info["alpha_source"] == "none" and info["alpha"].min() == 1.0
  # The whole frame shrinks to the foreground ratio: the red square stays top-left.
  red = (image[..., 0] > 0.6) & (image[..., 1] < 0.4)
  rows, cols = np.nonzero(red)
  assert rows.mean() < 15 and cols.mean() < 15
  auto, _ = preprocess.preprocess_image(rgb, size=40, matting_fn="builtin")
  rows, cols = np.nonzero((auto[..., 0] > 0.6) & (auto[..., 1] < 0.4))
  assert abs(rows.mean() - 19.5) < 2 and abs(cols.mean() - 19.5) < 2  # builtin recentres


def _fake_rembg(monkeypatch, tmp_path, calls):
  """A stand-in rembg module (the real one is an optional extra) and a model file."""
  import sys
  import types
  from PIL import Image
  module = types.ModuleType("rembg")
  module.new_session = lambda model: calls.append(("session", model)) or model

  def remove(image, session, only_mask):
    calls.append(("remove", session, only_mask))
    rgb = np.asarray(image)
    return Image.fromarray(np.where(rgb[..., 0] < 128, 255, 0).astype(np.uint8))
  module.remove = remove
  monkeypatch.setitem(sys.modules, "rembg", module)
  monkeypatch.setenv("U2NET_HOME", str(tmp_path))
  monkeypatch.setattr(preprocess, "_REMBG_SESSIONS", {})


def test_auto_uses_rembg_when_installed_with_its_model(tmp_path, monkeypatch):
  calls = []
  _fake_rembg(monkeypatch, tmp_path, calls)
  rgb = np.ones((32, 32, 3), np.float32)
  rgb[8:24, 8:24] = 0.0
  # The package without the model file: auto falls back, rembg names the file.
  assert preprocess._resolve_matting("auto")[1] == "grabcut"
  with pytest.raises(RuntimeError, match="rembg d isnet-general-use"):
    preprocess._resolve_matting("rembg")
  (tmp_path / "isnet-general-use.onnx").write_bytes(b"")
  fn, name = preprocess._resolve_matting("auto")
  assert name == "rembg:isnet-general-use"
  alpha = fn(rgb)
  assert alpha[16, 16] == 1.0 and alpha[0, 0] == 0.0
  assert calls[0] == ("session", "isnet-general-use") and calls[1][2] is True
  _, info = preprocess.preprocess_image(rgb, size=32, matting_fn="auto")
  assert info["alpha_source"] == "rembg:isnet-general-use"


def test_infer_config_names_a_missing_rembg_model(tmp_path, monkeypatch):
  from configs import infer as infer_configs
  from vf3d_jax.inference import pipeline
  _fake_rembg(monkeypatch, tmp_path, [])
  config = infer_configs.get_config("demo")
  config.preprocess.matting = "rembg:u2net"
  with pytest.raises(ValueError, match=r"^preprocess.matting: rembg model 'u2net' not found"):
    pipeline.validate_config(config)
  config.preprocess.matting = "auto"
  pipeline.validate_config(config)  # no model file: auto is the GrabCut matte
