"""Tests of the quality filter: planted signal, honest CV, labels files, save / load."""

import json
import os

import numpy as np
import pytest
from sklearn import metrics
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vf3d_jax.engine import quality
from vf3d_jax.engine.quality import QualityFilter

# The median of a chi-square with 4 degrees of freedom: half the latents fall inside.
_RADIUS = np.sqrt(3.357)


def _shell_data(n: int, seed: int, dim: int = 64, latent: int = 4, noise: float = 0.3,
                flip: float = 0.05):
  """Features of a hidden nonlinear good / bad rule.

  A latent ``z ~ N(0, I_4)`` is spread over ``dim`` features by a fixed random
  linear map plus isotropic noise (as a video's quality shows in many
  correlated feature dims); a video is good iff ``|z| < radius``, a sphere no
  linear classifier can draw. ``flip`` of the labels are flipped.

  Returns:
    ``features [n, dim] float32``, noisy labels ``[n]`` bool, clean labels ``[n]`` bool.
  """
  rng = np.random.default_rng(seed)
  mixing = np.random.default_rng(1234).standard_normal((latent, dim)) / np.sqrt(latent)
  z = rng.standard_normal((n, latent))
  features = (z @ mixing + noise * rng.standard_normal((n, dim))).astype(np.float32)
  clean = np.linalg.norm(z, axis=1) < _RADIUS
  noisy = clean ^ (rng.random(n) < flip)
  return features, noisy, clean


@pytest.fixture(scope="module")
def shell():
  return _shell_data(2000, seed=0)


def test_planted_signal_cross_validated_accuracy(shell):
  x, y, _ = shell
  cv = QualityFilter(C=1.0).cross_validated_accuracy(x, y, folds=5)
  print(f"\nSVM 5-fold CV: accuracy {cv['accuracy_mean']:.3f} +- {cv['accuracy_std']:.3f}, "
        f"balanced {cv['balanced_accuracy_mean']:.3f}, AUC {cv['auc_mean']:.3f}")
  # The ceiling is 0.95 (5% of the labels are flipped).
  assert cv["folds"] == 5 and len(cv["fold_accuracy"]) == 5
  assert cv["accuracy_mean"] > 0.85
  assert cv["balanced_accuracy_mean"] > 0.85
  assert cv["accuracy_std"] < 0.05
  # A linear model on the same folds sees nothing: the rule is a sphere.
  linear = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), x, y,
                           cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean()
  print(f"logistic regression 5-fold CV: accuracy {linear:.3f}")
  assert linear < 0.65
  assert cv["accuracy_mean"] > linear + 0.2


def test_cross_validation_is_honest_on_random_labels(shell):
  x, _, _ = shell
  y = np.random.default_rng(7).random(len(x)) < 0.5
  qf = QualityFilter()
  cv = qf.cross_validated_accuracy(x, y)
  print(f"\nrandom labels: CV accuracy {cv['accuracy_mean']:.3f}, AUC {cv['auc_mean']:.3f}")
  assert 0.35 < cv["accuracy_mean"] < 0.65
  assert 0.35 < cv["balanced_accuracy_mean"] < 0.65
  assert qf.model is None  # Cross-validation leaves the filter unfitted.


def test_scores_rank_held_out_good_above_bad(shell):
  x, y, clean = shell
  qf = QualityFilter()
  summary = qf.fit(x[:1500], y[:1500], cv_folds=None)
  assert summary["cv"] is None
  score = qf.score(x[1500:])
  assert score.shape == (500,) and score.dtype == np.float64
  auc = metrics.roc_auc_score(clean[1500:], score)
  print(f"\nheld-out AUC against the clean labels: {auc:.3f}")
  assert auc > 0.9
  # keep is score > threshold; at the default threshold (0) it is SVC.predict.
  np.testing.assert_array_equal(qf.keep(x[1500:]), score > 0)
  np.testing.assert_array_equal(qf.keep(x[1500:]), qf.model.predict(x[1500:]))
  np.testing.assert_array_equal(qf.keep(x[1500:], threshold=0.5), score > 0.5)
  assert np.mean(qf.keep(x[1500:]) == clean[1500:]) > 0.85


def test_fit_summary_and_fewer_folds_for_a_small_class():
  x, _, _ = _shell_data(60, seed=3)
  y = np.zeros(60, bool)
  y[:3] = True
  summary = QualityFilter(C=2.0, seed=5).fit(x, y.astype(np.int64))
  assert summary["cv"]["folds"] == 3
  assert {k: summary[k] for k in ("n", "n_good", "n_bad", "feature_dim", "C", "seed")} == {
      "n": 60, "n_good": 3, "n_bad": 57, "feature_dim": 64, "C": 2.0, "seed": 5}
  assert summary["score"] == "decision_function" and summary["threshold"] == 0.0
  assert summary["kernel"] == "rbf" and summary["class_weight"] == "balanced"
  assert summary["gamma"] == pytest.approx(1 / 64)
  assert summary["sklearn_version"].startswith("1.")
  assert sum(summary["n_support"]) > 0
  y[1:3] = False
  with pytest.raises(ValueError, match="at least 2 good and 2 bad"):
    QualityFilter().fit(x, y)
  with pytest.raises(ValueError, match="bool"):
    QualityFilter().fit(x, np.where(y, "good", "bad"))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    QualityFilter().fit(x[0], y)


def test_probability_scores():
  x, y, clean = _shell_data(500, seed=4)
  qf = QualityFilter(probability=True, seed=1)
  summary = qf.fit(x[:400], y[:400], cv_folds=3)
  assert summary["score"] == "probability_good" and qf.threshold == 0.5
  assert summary["cv"]["accuracy_mean"] > 0.7
  p = qf.score(x[400:])
  assert np.all((p >= 0) & (p <= 1))
  assert metrics.roc_auc_score(clean[400:], p) > 0.85
  again = QualityFilter(probability=True, seed=1)
  again.fit(x[:400], y[:400], cv_folds=3)
  np.testing.assert_array_equal(again.score(x[400:]), p)


def test_deterministic_for_a_seed():
  x, y, _ = _shell_data(400, seed=5)
  a, b, c = QualityFilter(seed=0), QualityFilter(seed=0), QualityFilter(seed=1)
  sa, sb, sc = a.fit(x, y), b.fit(x, y), c.fit(x, y)
  assert sa == sb
  np.testing.assert_array_equal(a.score(x), b.score(x))
  assert sa["cv"]["fold_accuracy"] != sc["cv"]["fold_accuracy"]  # Other folds.
  np.testing.assert_array_equal(a.score(x), c.score(x))  # The final fit has no randomness.


def test_save_load_round_trip(tmp_path):
  x, y, _ = _shell_data(300, seed=6)
  qf = QualityFilter(C=3.0)
  qf.fit(x, y, cv_folds=3)
  qf.threshold = 0.25
  path = tmp_path / "quality_svm.joblib"
  qf.save(path)
  with open(f"{path}.json") as f:
    sidecar = json.load(f)
  assert sidecar["format"] == "vf3d_jax.quality_filter/1"
  assert sidecar["threshold"] == 0.25 and sidecar["feature_dim"] == 64
  assert sidecar["cv"]["folds"] == 3 and len(sidecar["model_sha256"]) == 64
  loaded = QualityFilter.load(path, feature_dim=64)
  np.testing.assert_array_equal(loaded.score(x), qf.score(x))
  np.testing.assert_array_equal(loaded.keep(x), qf.score(x) > 0.25)
  assert loaded.C == 3.0 and loaded.threshold == 0.25
  assert loaded.summary == dict(qf.summary, threshold=0.25)


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(ValueError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_load_refuses_mismatches(tmp_path):
  x, y, _ = _shell_data(200, seed=7)
  qf = QualityFilter()
  qf.fit(x, y, cv_folds=None)
  path = os.fspath(tmp_path / "svm.joblib")
  qf.save(path)
  assert "64-D" in _one_line_error(QualityFilter.load, path, feature_dim=768)
  assert "fitted on 64-D features, got 32-D" in _one_line_error(qf.score, x[:, :32])
  with open(path + ".json") as f:
    sidecar = json.load(f)
  with open(path + ".json", "w") as f:
    json.dump(dict(sidecar, sklearn_version="1.4.2"), f)
  assert "scikit-learn 1.4.2" in _one_line_error(QualityFilter.load, path)
  with open(path + ".json", "w") as f:
    json.dump(sidecar, f)
  with open(path, "ab") as f:
    f.write(b"\0")
  assert "SHA-256" in _one_line_error(QualityFilter.load, path)
  os.remove(path + ".json")
  assert "sidecar" in _one_line_error(QualityFilter.load, path)


def _write(tmp_path, name: str, text: str) -> str:
  path = tmp_path / name
  path.write_text(text)
  return os.fspath(path)


def test_read_labels_formats(tmp_path):
  want = {"vid_000": True, "vid_001": False, "vid_002": True, "vid_003": False,
          "vid_004": True, "vid_005": False}
  body = "vid_000,good\nvid_001,bad\n\nvid_002, 1\nvid_003,0\nvid_004,TRUE\nvid_005,False\n"
  assert quality.read_labels(_write(tmp_path, "a.csv", body)) == want
  assert quality.read_labels(_write(tmp_path, "b.csv", "video_id,label\n" + body)) == want
  assert quality.read_labels(_write(tmp_path, "c.csv", "\ufeffid,quality\n" + body)) == want
  assert quality.read_labels(_write(tmp_path, "d.tsv", body.replace(",", "\t"))) == want
  assert quality.read_labels(
      _write(tmp_path, "e.txt", "video_id\tlabel\n" + body.replace(",", "\t"))) == want
  jsonl = "".join(json.dumps({"id": k, "label": v}) + "\n" for k, v in want.items())
  assert quality.read_labels(_write(tmp_path, "f.jsonl", jsonl)) == want
  assert quality.read_labels(_write(tmp_path, "g.txt", jsonl)) == want
  mixed = ('{"id": "a", "label": "good"}\n{"video_id": "b", "label": 0}\n'
           '{"id": 7, "label": true}\n')
  assert quality.read_labels(_write(tmp_path, "h.jsonl", mixed)) == {
      "a": True, "b": False, "7": True}
  assert list(quality.read_labels(_write(tmp_path, "i.csv", body))) == list(want)


@pytest.mark.parametrize("name, text, line, problem", [
    ("a.csv", "vid_0,good\nvid_1,bad\nvid_2,maybe\n", 3, "good/bad/1/0/true/false"),
    ("b.csv", "vid_0,good,extra\n", 1, "two fields"),
    ("c.csv", "video_id,label\nvid_0,good\nvid_0,bad\n", 3, "already labelled on line 2"),
    ("d.csv", "vid_0,maybe\n", 1, "good/bad/1/0/true/false"),
    ("e.csv", " ,good\n", 1, "empty video id"),
    ("f.tsv", "vid_0,good\n", 1, "two fields"),
    ("g.jsonl", '{"id": "a", "label": "good"}\n{"id": "b", "label": 2}\n', 2, "good/bad"),
    ("h.jsonl", '{"id": "a", "label": "good"}\n{"id": "b",\n', 2, "JSON object"),
    ("i.jsonl", '{"label": "good"}\n', 1, '"id"'),
    ("j.jsonl", '{"id": "a"}\n', 1, '"label"'),
])
def test_read_labels_bad_row_is_one_line(tmp_path, name, text, line, problem):
  path = _write(tmp_path, name, text)
  message = _one_line_error(quality.read_labels, path)
  assert message.startswith(f"{path}:{line}: ")
  assert problem in message


def test_read_labels_empty_file(tmp_path):
  assert "no labels" in _one_line_error(quality.read_labels, _write(tmp_path, "a.csv", "\n"))
  assert "no labels" in _one_line_error(quality.read_labels,
                                        _write(tmp_path, "b.csv", "video_id,label\n"))
