"""Quality filter of generated orbit videos: an RBF SVM on video features.

VFusion3D's data engine (arXiv 2403.12034) keeps the generated multi-view
orbit videos that an SVM, trained on DINO features of 2,000 hand-labelled
videos, calls good. This module is that classifier and the reader of its
labels file. Features are computed elsewhere, one row per video:
``[N, D] float32`` (any float dtype is accepted; sklearn works in float64).

Conventions:
  * Labels: ``True`` = good (keep the video), ``False`` = bad.
  * Model: ``StandardScaler`` (per-feature mean and standard deviation of the
    training rows) then ``SVC(kernel="rbf", C=C, gamma="scale",
    class_weight="balanced")``. ``gamma="scale"`` is ``1 / (D var(X))`` of the
    standardised training features, i.e. about ``1 / D``; its value is in the
    summary. ``class_weight="balanced"`` weights each class by ``N / (2 N_c)``
    so an unbalanced labelled set does not tilt the boundary.
  * Score (default, ``probability=False``): the SVM decision function
    ``f(x) = sum_i alpha_i y_i K(x_i, x) + b`` with ``y_i = +1`` for good.
    Positive is the good side, 0 is the boundary, and it grows with the
    distance from the boundary (it is the signed distance in the kernel's
    feature space times the weight vector's norm, so compare scores of one
    fitted model only). It is deterministic and needs no internal
    cross-validation. The default threshold is 0.
  * Score with ``probability=True``: ``P(good)`` from Platt scaling (a
    sigmoid of the decision function) fitted on out-of-fold decision values
    of a seeded stratified k-fold (``CalibratedClassifierCV(...,
    ensemble=False)``; the SVM itself is fitted on all rows). The default
    threshold is 0.5. It is monotone in the decision function, so it keeps
    the same videos as some decision threshold.
  * ``keep`` is ``score > threshold``, which at the default threshold is
    exactly ``SVC.predict``.
  * Determinism: the only randomness is the fold shuffling of the
    cross-validation and of the calibration, both seeded by ``seed``; libsvm
    is deterministic for a given row order.

Saved models are a joblib (pickle) file and a JSON sidecar ``<file>.json``
with the training summary. Unpickling can run arbitrary code: load only files
you made. ``QualityFilter.load`` checks the sidecar first (the file's SHA-256,
the feature dim and the scikit-learn major.minor) and refuses to unpickle a
file that does not match it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from typing import Any

import numpy as np

from vf3d_jax.engine import checks

_LABEL_WORDS = {"good": True, "true": True, "1": True,
                "bad": False, "false": False, "0": False}
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_FORMAT = "vf3d_jax.quality_filter/1"


def _row_error(path: str, lineno: int, problem: str, text: str) -> ValueError:
  text = text if len(text) <= 80 else text[:77] + "..."
  return ValueError(f"{path}:{lineno}: {problem}; got {text!r}")


def _parse_label(value: Any) -> bool | None:
  """``True`` / ``False`` for a label word, bool or 0/1 integer, else ``None``."""
  if isinstance(value, bool):
    return value
  if isinstance(value, int) and value in (0, 1):
    return bool(value)
  if isinstance(value, str):
    return _LABEL_WORDS.get(value.strip().lower())
  return None


def read_labels(path: str | os.PathLike) -> dict[str, bool]:
  """Reads a labels file: video id -> ``True`` (good) / ``False`` (bad).

  Formats, chosen by suffix (``.csv``, ``.tsv``, ``.jsonl`` / ``.ndjson`` /
  ``.json``) or else by the first non-blank line (``{`` -> JSONL, a tab ->
  TSV, otherwise CSV):
    * CSV / TSV: ``video_id,label`` rows, exactly two fields, whitespace
      around them stripped, standard CSV quoting per line. An optional header
      is the first row when its label field is ``label`` or its id field is
      ``video_id`` / ``id`` (case-insensitive).
    * JSONL: one object per line, ``{"id": ..., "label": ...}`` (``video_id``
      is accepted for ``id``; an integer id is read as its decimal string).

  Labels are ``good`` / ``bad`` / ``1`` / ``0`` / ``true`` / ``false``
  (case-insensitive), and in JSONL also JSON booleans and the integers 0 / 1.
  Blank lines are skipped.

  Args:
    path: the labels file (UTF-8, an optional BOM is ignored).

  Returns:
    ``{video_id: is_good}`` in file order.

  Raises:
    ValueError: one line naming the file and line, for a malformed row, an
      unknown label, an empty id, an id given twice, or a file with no rows.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8-sig") as f:
    lines = f.read().splitlines()
  first = next((line for line in lines if line.strip()), "")
  suffix = os.path.splitext(path)[1].lower()
  if suffix in _JSONL_SUFFIXES or (suffix not in (".csv", ".tsv")
                                   and first.lstrip().startswith("{")):
    kind = "jsonl"
  elif suffix == ".tsv" or (suffix != ".csv" and "\t" in first):
    kind = "tsv"
  else:
    kind = "csv"

  labels: dict[str, bool] = {}
  seen_at: dict[str, int] = {}
  first_row = True
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    if kind == "jsonl":
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        raise _row_error(path, lineno, 'expected a JSON object {"id": ..., "label": ...}',
                         line) from None
      if not isinstance(obj, dict):
        raise _row_error(path, lineno, 'expected a JSON object {"id": ..., "label": ...}', line)
      video_id = obj.get("id", obj.get("video_id"))
      if isinstance(video_id, int) and not isinstance(video_id, bool):
        video_id = str(video_id)
      if not isinstance(video_id, str) or not video_id.strip():
        raise _row_error(path, lineno, 'expected a non-empty string "id"', line)
      if "label" not in obj:
        raise _row_error(path, lineno, 'expected a "label"', line)
      label = _parse_label(obj["label"])
    else:
      fields = next(csv.reader([line], delimiter="\t" if kind == "tsv" else ","), [])
      fields = [field.strip() for field in fields]
      if len(fields) != 2:
        sep = "<tab>" if kind == "tsv" else ","
        raise _row_error(path, lineno, f"expected two fields 'video_id{sep}label'", line)
      video_id, word = fields
      label = _parse_label(word)
      if first_row and label is None and (
          word.lower() == "label" or video_id.lower() in ("video_id", "id")):
        first_row = False
        continue  # The header.
      if not video_id:
        raise _row_error(path, lineno, "empty video id", line)
    first_row = False
    if label is None:
      raise _row_error(path, lineno, "label must be good/bad/1/0/true/false", line)
    video_id = video_id.strip()
    if video_id in seen_at:
      raise _row_error(path, lineno, f"video id {video_id!r} already labelled on line "
                       f"{seen_at[video_id]}", line)
    seen_at[video_id] = lineno
    labels[video_id] = label
  if not labels:
    raise ValueError(f"{path}: no labels")
  return labels


def _sklearn_version() -> str:
  import sklearn  # pylint: disable=g-import-not-at-top
  return sklearn.__version__


def _major_minor(version: str) -> str:
  return ".".join(version.split(".")[:2])


def _check_features(name: str, features: Any, feature_dim: int | None = None) -> np.ndarray:
  return checks.check_features(name, features, feature_dim, fitted="filter", dtype=np.float64)


def _check_labels(name: str, labels: Any, n: int) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,):
    raise ValueError(f"{name}: expected labels [{n}], got shape {y.shape}")
  if y.dtype != np.bool_:
    if not np.issubdtype(y.dtype, np.integer) or not np.all((y == 0) | (y == 1)):
      raise ValueError(f"{name}: labels must be bool (True = good) or 0/1 integers, "
                       f"got dtype {y.dtype}")
    y = y.astype(bool)
  return y


def _folds_for(name: str, y: np.ndarray, folds: int) -> int:
  """``folds`` capped by the smaller class's count; at least 2 of each class."""
  if folds < 2:
    raise ValueError(f"{name}: folds must be at least 2, got {folds}")
  smaller = int(min(y.sum(), (~y).sum()))
  if smaller < 2:
    raise ValueError(f"{name}: needs at least 2 good and 2 bad videos, "
                     f"got {int(y.sum())} good and {int((~y).sum())} bad")
  return min(folds, smaller)


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class QualityFilter:
  """Good / bad classifier of orbit videos from their features (see the module doc).

  Typical use::

    qf = QualityFilter(C=1.0)
    summary = qf.fit(features, labels)     # [N, D], [N] bool; 5-fold CV inside
    mask = qf.keep(new_features)           # [M] bool
    qf.save("quality_svm.joblib")          # + quality_svm.joblib.json
    qf = QualityFilter.load("quality_svm.joblib", feature_dim=D)

  Attributes:
    C: the SVM's soft-margin penalty.
    probability: score with the calibrated ``P(good)`` instead of the decision
      function.
    threshold: ``keep`` keeps ``score > threshold``; ``None`` at construction
      means 0 for the decision function and 0.5 for the probability.
    seed: seeds the cross-validation folds and the calibration folds.
    calibration_folds: folds of the Platt calibration (``probability=True``).
    model: the fitted sklearn estimator, ``None`` before ``fit``.
    summary: the training summary that ``fit`` returns (also the sidecar).
  """

  def __init__(self, C: float = 1.0, *, probability: bool = False,
               threshold: float | None = None, seed: int = 0,
               calibration_folds: int = 5):
    if not C > 0:
      raise ValueError(f"QualityFilter: C must be positive, got {C}")
    self.C = float(C)
    self.probability = bool(probability)
    self.threshold = float(threshold) if threshold is not None else (
        0.5 if self.probability else 0.0)
    self.seed = int(seed)
    self.calibration_folds = int(calibration_folds)
    self.model = None
    self.summary: dict[str, Any] | None = None

  @property
  def feature_dim(self) -> int | None:
    return None if self.summary is None else self.summary["feature_dim"]

  def _new_model(self, y: np.ndarray):
    """An unfitted estimator for labels ``y`` (the calibration folds depend on them)."""
    # pylint: disable=g-import-not-at-top
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC
    # pylint: enable=g-import-not-at-top
    pipeline = Pipeline([
        ("scaler", StandardScaler()),
        ("svc", SVC(kernel="rbf", C=self.C, gamma="scale", class_weight="balanced")),
    ])
    if not self.probability:
      return pipeline
    folds = _folds_for("QualityFilter calibration", y, self.calibration_folds)
    return CalibratedClassifierCV(
        pipeline, method="sigmoid", ensemble=False,
        cv=StratifiedKFold(folds, shuffle=True, random_state=self.seed))

  def _score_with(self, model, x: np.ndarray) -> np.ndarray:
    if self.probability:
      good = list(model.classes_).index(True)
      return model.predict_proba(x)[:, good]
    return model.decision_function(x)

  def cross_validated_accuracy(self, features: Any, labels: Any, *,
                               folds: int = 5) -> dict[str, Any]:
    """Stratified k-fold estimate of the filter's accuracy; the fitted model is untouched.

    Each fold fits a fresh model (scaler, SVM and, with ``probability``, its
    calibration) on the other folds only and classifies its rows with
    ``score > threshold``. Folds are shuffled with ``seed``.

    Args:
      features: ``[N, D]``.
      labels: ``[N]`` bool (True = good) or 0/1.
      folds: k; capped by the smaller class's count (at least 2 of each class).

    Returns:
      ``folds`` (k used), ``accuracy_mean`` / ``accuracy_std``,
      ``balanced_accuracy_mean`` / ``balanced_accuracy_std`` (the mean of the
      two classes' recalls), ``auc_mean`` / ``auc_std`` (ROC AUC of the score,
      threshold-free), and the per-fold lists ``fold_accuracy``,
      ``fold_balanced_accuracy``, ``fold_auc``. Standard deviations are over
      folds (population, ``ddof=0``).
    """
    # pylint: disable=g-import-not-at-top
    from sklearn import metrics
    from sklearn.model_selection import StratifiedKFold
    # pylint: enable=g-import-not-at-top
    x = _check_features("QualityFilter.cross_validated_accuracy", features)
    y = _check_labels("QualityFilter.cross_validated_accuracy", labels, len(x))
    k = _folds_for("QualityFilter.cross_validated_accuracy", y, folds)
    acc, bal, auc = [], [], []
    for train, test in StratifiedKFold(k, shuffle=True, random_state=self.seed).split(x, y):
      model = self._new_model(y[train]).fit(x[train], y[train])
      score = self._score_with(model, x[test])
      acc.append(float(metrics.accuracy_score(y[test], score > self.threshold)))
      bal.append(float(metrics.balanced_accuracy_score(y[test], score > self.threshold)))
      auc.append(float(metrics.roc_auc_score(y[test], score)))
    return {
        "folds": k,
        "accuracy_mean": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
        "balanced_accuracy_mean": float(np.mean(bal)),
        "balanced_accuracy_std": float(np.std(bal)),
        "auc_mean": float(np.mean(auc)), "auc_std": float(np.std(auc)),
        "fold_accuracy": acc, "fold_balanced_accuracy": bal, "fold_auc": auc,
    }

  def fit(self, features: Any, labels: Any, *, cv_folds: int | None = 5) -> dict[str, Any]:
    """Fits the filter on all rows, after a cross-validated estimate of its accuracy.

    Args:
      features: ``[N, D]``, one row per labelled video.
      labels: ``[N]`` bool (True = good) or 0/1.
      cv_folds: k of ``cross_validated_accuracy``; ``None`` skips it.

    Returns:
      The summary (also ``self.summary`` and the saved sidecar): ``n``,
      ``n_good``, ``n_bad``, ``feature_dim``, ``C``, ``gamma`` (the value
      ``"scale"`` came to), ``kernel``, ``class_weight``, ``probability``,
      ``score`` (``"decision_function"`` or ``"probability_good"``),
      ``threshold``, ``seed``, ``calibration_folds`` (``None`` without
      ``probability``), ``n_support`` (``[bad, good]``), ``cv`` (the
      ``cross_validated_accuracy`` dict, or ``None``), ``train_accuracy``,
      ``sklearn_version``.
    """
    x = _check_features("QualityFilter.fit", features)
    y = _check_labels("QualityFilter.fit", labels, len(x))
    _folds_for("QualityFilter.fit", y, 2)
    cv = None if cv_folds is None else self.cross_validated_accuracy(x, y, folds=cv_folds)
    model = self._new_model(y).fit(x, y)
    pipeline = model.calibrated_classifiers_[0].estimator if self.probability else model
    svc = pipeline.named_steps["svc"]
    standardised = pipeline.named_steps["scaler"].transform(x)
    self.model = model
    self.summary = {
        "n": int(len(y)), "n_good": int(y.sum()), "n_bad": int((~y).sum()),
        "feature_dim": int(x.shape[1]),
        "C": self.C, "gamma": float(1.0 / (x.shape[1] * standardised.var())),
        "kernel": "rbf", "class_weight": "balanced",
        "probability": self.probability,
        "score": "probability_good" if self.probability else "decision_function",
        "threshold": self.threshold, "seed": self.seed,
        "calibration_folds": self.calibration_folds if self.probability else None,
        "n_support": [int(v) for v in svc.n_support_],
        "cv": cv,
        "train_accuracy": float(np.mean((self._score_with(model, x) > self.threshold) == y)),
        "sklearn_version": _sklearn_version(),
    }
    return self.summary

  def _fitted_features(self, name: str, features: Any) -> np.ndarray:
    if self.model is None:
      raise ValueError(f"{name}: the filter is not fitted (call fit or load)")
    return _check_features(name, features, self.feature_dim)

  def score(self, features: Any) -> np.ndarray:
    """Quality scores, higher = better.

    Args:
      features: ``[N, D]``, D the fitted feature dim.

    Returns:
      ``[N]`` float64: the SVM decision function (signed, 0 on the boundary,
      positive = good), or ``P(good)`` in ``[0, 1]`` with ``probability``.
    """
    x = self._fitted_features("QualityFilter.score", features)
    return self._score_with(self.model, x)

  def keep(self, features: Any, threshold: float | None = None) -> np.ndarray:
    """Which videos to keep: ``[N]`` bool, ``score > threshold`` (default ``self.threshold``)."""
    threshold = self.threshold if threshold is None else float(threshold)
    return self.score(features) > threshold

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model to ``path`` (joblib pickle) and the summary to ``<path>.json``.

    The sidecar also holds the pickle's SHA-256 and the current
    ``threshold``, so a threshold changed after fitting is saved too.
    """
    import joblib  # pylint: disable=g-import-not-at-top
    if self.model is None:
      raise ValueError("QualityFilter.save: the filter is not fitted")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Both files via temporary names: a kill leaves the previous pair or none.
    joblib.dump(self.model, path + ".tmp")
    sidecar = dict(self.summary, threshold=self.threshold, format=_FORMAT,
                   model_file=os.path.basename(path), model_sha256=_file_sha256(path + ".tmp"))
    with open(path + ".json.tmp", "w") as f:
      json.dump(sidecar, f, indent=1)
      f.write("\n")
    os.replace(path + ".tmp", path)
    os.replace(path + ".json.tmp", path + ".json")

  @classmethod
  def load(cls, path: str | os.PathLike, *, feature_dim: int | None = None) -> QualityFilter:
    """Loads a filter saved by ``save``. Unpickles ``path``: load only files you made.

    Args:
      path: the joblib file; its sidecar ``<path>.json`` must be next to it.
      feature_dim: if given, the D the caller's features have; a filter fitted
        on another D is refused before anything is unpickled.

    Raises:
      ValueError: one line, when the sidecar is missing or not ours, the
        feature dim differs, the file was saved with another scikit-learn
        major.minor, or the file's SHA-256 is not the sidecar's.
    """
    import joblib  # pylint: disable=g-import-not-at-top
    path = os.fspath(path)
    try:
      with open(path + ".json") as f:
        sidecar = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"QualityFilter.load: cannot read the sidecar {path}.json "
                       f"({type(e).__name__})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != _FORMAT:
      raise ValueError(f"QualityFilter.load: {path}.json is not a {_FORMAT} sidecar")
    if feature_dim is not None and sidecar["feature_dim"] != feature_dim:
      raise ValueError(f"QualityFilter.load: {path} was fitted on {sidecar['feature_dim']}-D "
                       f"features, expected {feature_dim}-D")
    saved, current = sidecar["sklearn_version"], _sklearn_version()
    if _major_minor(saved) != _major_minor(current):
      raise ValueError(f"QualityFilter.load: {path} was saved with scikit-learn {saved}, "
                       f"this is {current}; refit it (pickles need the same major.minor)")
    if _file_sha256(path) != sidecar["model_sha256"]:
      raise ValueError(f"QualityFilter.load: {path} does not match the SHA-256 in its "
                       f"sidecar; refusing to unpickle it")
    qf = cls(sidecar["C"], probability=sidecar["probability"],
             threshold=sidecar["threshold"], seed=sidecar["seed"],
             calibration_folds=sidecar["calibration_folds"] or 5)
    qf.model = joblib.load(path)
    if getattr(qf.model, "n_features_in_", None) != sidecar["feature_dim"]:
      raise ValueError(f"QualityFilter.load: {path} holds a model of "
                       f"{getattr(qf.model, 'n_features_in_', None)}-D features, its sidecar "
                       f"says {sidecar['feature_dim']}-D")
    qf.summary = {k: v for k, v in sidecar.items()
                  if k not in ("format", "model_file", "model_sha256")}
    return qf
