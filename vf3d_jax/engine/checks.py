"""Input checks shared by the engine's classifiers."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_features(name: str, features: Any, feature_dim: int | None = None, *,
                   fitted: str = "model", dtype=np.float32) -> np.ndarray:
  """``features`` as a finite ``[N, D]`` array of ``dtype`` (N >= 1, D = ``feature_dim`` if given).

  Raises:
    ValueError: one line naming ``name`` and what is wrong (``fitted`` names what
      was fitted on ``feature_dim``-D features: "filter", "estimator").
  """
  x = np.asarray(features)
  if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"{name}: expected numeric features [N, D] with N >= 1, "
                     f"got shape {x.shape} dtype {x.dtype}")
  if feature_dim is not None and x.shape[1] != feature_dim:
    raise ValueError(f"{name}: the {fitted} was fitted on {feature_dim}-D features, "
                     f"got {x.shape[1]}-D")
  x = x.astype(dtype)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: features contain NaN or inf")
  return x
