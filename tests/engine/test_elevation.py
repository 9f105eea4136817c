"""Tests of the elevation MLP: planted signal, honest held-out error, save / load."""

import json
import math
import os

import numpy as np
import pytest

from tests.engine.test_quality import _one_line_error
from vf3d_jax.engine.elevation import ElevationEstimator


def _elevation_data(n: int, seed: int, informative: bool = True):
  """Features that encode elevation nonlinearly, with distractors.

  ``e ~ U(-45, 45)`` degrees; 128 features are ``tanh`` of a fixed random
  projection of ``[sin e, cos e, e^2]`` plus N(0, 0.05^2) noise, and 32 more
  are N(0, 1) distractors. ``informative=False`` gives N(0, 1) features
  independent of ``e``.

  Returns:
    ``features [n, 160] float32``, ``elevations [n] float32`` radians.
  """
  rng = np.random.default_rng(seed)
  e = rng.uniform(-math.pi / 4, math.pi / 4, n)
  fixed = np.random.default_rng(4321)
  projection = fixed.standard_normal((3, 128))
  offset = 0.5 * fixed.standard_normal(128)
  z = np.stack([np.sin(e), np.cos(e), e ** 2], axis=1)
  encoded = np.tanh(z @ projection + offset) + 0.05 * rng.standard_normal((n, 128))
  features = np.concatenate([encoded, rng.standard_normal((n, 32))], axis=1)
  if not informative:
    features = rng.standard_normal(features.shape)
  return features.astype(np.float32), e.astype(np.float32)


def test_planted_signal_held_out_error():
  x, e = _elevation_data(2000, seed=0)
  est = ElevationEstimator()
  report = est.fit(x, e, steps=1000, seed=0)
  print(f"\nelevation MLP: held-out MAE {report['val_mae_deg']:.3f} deg (median "
        f"{report['val_median_ae_deg']:.3f}), train {report['train_mae_deg']:.3f}, "
        f"predicting the mean {report['val_mean_baseline_mae_deg']:.2f}")
  assert report["n"] == 2000 and report["n_train"] == 1600 and report["n_val"] == 400
  assert report["feature_dim"] == 160 and report["batch_size"] == 256
  # The mean predictor is ~22.5 deg off; 2 deg is clearly good (measured ~0.5).
  assert report["val_mae_deg"] < 2.0
  assert report["val_median_ae_deg"] < report["val_mae_deg"] * 1.2
  assert report["val_mae_deg"] < 0.1 * report["val_mean_baseline_mae_deg"]
  # Fresh rows of the same distribution.
  x_new, e_new = _elevation_data(500, seed=1)
  pred = est.predict(x_new)
  assert pred.shape == (500,) and pred.dtype == np.float32
  assert np.degrees(np.mean(np.abs(pred - e_new))) < 2.0


def test_held_out_error_is_honest_on_uninformative_features():
  x, e = _elevation_data(1000, seed=2, informative=False)
  report = ElevationEstimator().fit(x, e, steps=300, seed=0)
  ratio = report["val_mae_deg"] / report["val_mean_baseline_mae_deg"]
  print(f"\nuninformative features: held-out MAE {report['val_mae_deg']:.2f} deg, "
        f"predicting the mean {report['val_mean_baseline_mae_deg']:.2f} (ratio {ratio:.2f}), "
        f"train {report['train_mae_deg']:.2f}")
  assert 0.9 < ratio < 1.6


def test_predictions_are_bounded():
  x, e = _elevation_data(300, seed=3)
  est = ElevationEstimator()
  est.fit(x, e, hidden=32, steps=100)
  pred = est.predict(1e4 * np.random.default_rng(0).standard_normal((50, 160)))
  assert np.all(np.abs(pred) <= math.pi / 2)


def test_deterministic_for_a_seed():
  x, e = _elevation_data(300, seed=4)
  a, b, c = ElevationEstimator(), ElevationEstimator(), ElevationEstimator()
  ra = a.fit(x, e, hidden=32, steps=60, batch_size=64, seed=0)
  rb = b.fit(x, e, hidden=32, steps=60, batch_size=64, seed=0)
  rc = c.fit(x, e, hidden=32, steps=60, batch_size=64, seed=1)
  assert ra == rb
  np.testing.assert_array_equal(a.predict(x), b.predict(x))
  assert not np.array_equal(a.predict(x), c.predict(x))
  assert ra["val_mae_deg"] != rc["val_mae_deg"]


def test_save_load_round_trip(tmp_path):
  x, e = _elevation_data(300, seed=5)
  est = ElevationEstimator()
  report = est.fit(x, e, hidden=48, steps=80, batch_size=None, val_fraction=0.25)
  assert report["batch_size"] is None and report["n_val"] == 75
  directory = tmp_path / "elevation_mlp"
  est.save(directory)
  assert sorted(os.listdir(directory)) == ["elevation.json", "params.npz"]
  with open(directory / "elevation.json") as f:
    config = json.load(f)
  assert config["format"] == "vf3d_jax.elevation_mlp/1"
  assert config["architecture"]["hidden"] == 48 and config["architecture"]["feature_dim"] == 160
  assert len(config["scaler"]["mean"]) == 160 and config["report"] == report
  with np.load(directory / "params.npz", allow_pickle=False) as arrays:
    assert arrays["Dense_0/kernel"].shape == (160, 48)
    assert arrays["Dense_2/kernel"].shape == (48, 1)
  loaded = ElevationEstimator.load(directory, feature_dim=160)
  np.testing.assert_array_equal(loaded.mean, est.mean)
  np.testing.assert_array_equal(loaded.std, est.std)
  np.testing.assert_array_equal(loaded.predict(x), est.predict(x))
  assert loaded.report == report


def test_refusals(tmp_path):
  x, e = _elevation_data(200, seed=6)
  est = ElevationEstimator()
  assert "not fitted" in _one_line_error(est.predict, x)
  assert "degrees?" in _one_line_error(est.fit, x, np.degrees(e))
  assert "[200]" in _one_line_error(est.fit, x, e[:10])
  est.fit(x, e, hidden=16, steps=20)
  assert "fitted on 160-D features, got 128-D" in _one_line_error(est.predict, x[:, :128])
  est.save(tmp_path)
  assert "160-D" in _one_line_error(ElevationEstimator.load, tmp_path, feature_dim=768)
  assert "cannot read" in _one_line_error(ElevationEstimator.load, tmp_path / "missing")
