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


def test_report_confidence_is_high_on_plain_and_low_on_clutter(cases):
  plain = next(c for c in cases if c["background"] == "plain")
  clutter = next(c for c in cases if c["background"] == "clutter")
  _, plain_report = matting.grabcut_matte(plain["rgb"], return_report=True)
  _, clutter_report = matting.grabcut_matte(clutter["rgb"], return_report=True)
  assert plain_report.confidence > 0.8
  assert clutter_report.confidence < plain_report.confidence


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
  assert preprocess._resolve_matting("auto")[1] == "builtin"
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
  pipeline.validate_config(config)  # no model file: auto is the built-in matte
