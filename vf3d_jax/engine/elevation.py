"""Camera elevation of an orbit video from features of its first frame: a small MLP.

VFusion3D's data engine annotates each kept video with the elevation of its
camera orbit, predicted from DINO features of the first frame by an MLP
trained on 3D renders whose elevation is known. This module is that
regressor; features are computed elsewhere, one row per video or render:
``[N, D] float32``.

Conventions:
  * Elevation is in radians, in ``[-pi/2, pi/2]``: the angle of the camera
    above the object's horizontal plane in whatever sign convention the
    training elevations use (the model learns theirs; VFusion3D's renders
    have positive = camera above, looking down).
  * Model: standardise each feature with the training rows' mean and
    standard deviation (a standard deviation below 1e-6 counts as 1), then
    ``Dense(hidden) -> GELU -> Dense(hidden) -> GELU -> Dense(1)`` and
    ``(pi/2) tanh`` of that: predictions are always valid elevations, and the
    map is almost linear around 0, where orbit elevations lie. GELU is the
    exact (erf) one.
  * Training: mean squared error in radians^2 on the training rows, AdamW
    with a cosine decay of the learning rate from ``lr`` to 0 over ``steps``,
    weight decay on the Dense kernels only (not the biases), full batch or
    seeded minibatches. The train step is jitted; all randomness (the
    held-out split, the initialisation, the minibatches) comes from ``seed``,
    so a fit is deterministic for a seed on one machine.
  * Held-out rows: ``round(val_fraction N)`` rows picked by a seeded
    permutation; the scaler and the weights see only the other rows.

Saved models are a folder with ``params.npz`` (the Dense weights, read with
``allow_pickle=False``) and ``elevation.json`` (the architecture, the scaler's
statistics and the training report); nothing is pickled.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vf3d_jax.engine import checks

_FORMAT = "vf3d_jax.elevation_mlp/1"
_PARAMS_FILE = "params.npz"
_CONFIG_FILE = "elevation.json"
_LAYERS = ("Dense_0", "Dense_1", "Dense_2")


class ElevationMLP(nn.Module):
  """Standardised features ``[..., D]`` -> elevation ``[...]`` radians in ``(-pi/2, pi/2)``."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.gelu(nn.Dense(self.hidden)(x), approximate=False)
    x = nn.gelu(nn.Dense(self.hidden)(x), approximate=False)
    return (math.pi / 2) * jnp.tanh(nn.Dense(1)(x)[..., 0])


@functools.partial(jax.jit, static_argnums=0)
def _predict(module: ElevationMLP, params: Any, mean: jax.Array, std: jax.Array,
             x: jax.Array) -> jax.Array:
  return module.apply({"params": params}, (x - mean) / std)


def _check_features(name: str, features: Any, feature_dim: int | None = None) -> np.ndarray:
  return checks.check_features(name, features, feature_dim, fitted="estimator", dtype=np.float32)


def _abs_error_deg(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  return np.degrees(np.abs(pred.astype(np.float64) - target.astype(np.float64)))


class ElevationEstimator:
  """Elevation regressor from features (see the module doc).

  Typical use::

    est = ElevationEstimator()
    report = est.fit(render_features, render_elevations)   # [N, D], [N] radians
    elevation = est.predict(video_features)                # [M] radians
    est.save("elevation_mlp/")
    est = ElevationEstimator.load("elevation_mlp/", feature_dim=D)

  Attributes:
    hidden: the width of both hidden layers (set by ``fit`` / ``load``).
    params: the Dense weights, ``None`` before ``fit``.
    mean: ``[D]`` float32, the scaler's feature means.
    std: ``[D]`` float32, the scaler's standard deviations.
    report: what ``fit`` returned.
  """

  def __init__(self):
    self.hidden: int | None = None
    self.params: Any = None
    self.mean: np.ndarray | None = None
    self.std: np.ndarray | None = None
    self.report: dict[str, Any] | None = None

  @property
  def feature_dim(self) -> int | None:
    return None if self.mean is None else int(self.mean.shape[0])

  def fit(self, features: Any, elevations: Any, *, hidden: int = 256, steps: int = 2000,
          lr: float = 3e-3, weight_decay: float = 1.0, batch_size: int | None = 256,
          seed: int = 0, val_fraction: float = 0.2) -> dict[str, Any]:
    """Trains the MLP from scratch.

    Args:
      features: ``[N, D]``, one row per render.
      elevations: ``[N]`` radians in ``[-pi/2, pi/2]``.
      hidden: width of the two hidden layers.
      steps: optimiser steps.
      lr: peak AdamW learning rate (cosine-decayed to 0).
      weight_decay: AdamW's decoupled weight decay on the kernels (each step
        shrinks them by ``lr_t * weight_decay``). The default is strong on
        purpose: with 1e-4 the MLP memorises a few thousand rows (held-out
        error several times larger on the planted-signal test).
      batch_size: rows per step, drawn without replacement each step with a
        seeded key; ``None`` (or at least the training rows) is full batch.
      seed: seeds the split, the initialisation and the minibatches.
      val_fraction: share of rows held out, in ``[0, 1)``; 0 holds none out.

    Returns:
      The report (also ``self.report`` and the saved JSON): ``n``,
      ``n_train``, ``n_val``, ``feature_dim``, the arguments above,
      ``final_train_loss`` (MSE, radians^2, of the last step's batch),
      ``train_mae_deg`` / ``train_median_ae_deg``, ``val_mae_deg`` /
      ``val_median_ae_deg`` and ``val_mean_baseline_mae_deg`` (the held-out
      MAE of predicting the training rows' mean elevation; all three ``None``
      without held-out rows). Errors are absolute differences in degrees.
    """
    x = _check_features("ElevationEstimator.fit", features)
    e = np.asarray(elevations)
    if e.shape != (len(x),) or not np.issubdtype(e.dtype, np.number):
      raise ValueError(f"ElevationEstimator.fit: expected elevations [{len(x)}], "
                       f"got shape {e.shape} dtype {e.dtype}")
    e = e.astype(np.float32)
    if not np.all(np.isfinite(e)) or np.max(np.abs(e)) > math.pi / 2 + 1e-6:
      raise ValueError(f"ElevationEstimator.fit: elevations must be finite radians in "
                       f"[-pi/2, pi/2], got max |e| = {np.max(np.abs(e)):.4g} (degrees?)")
    if not 0 <= val_fraction < 1:
      raise ValueError(f"ElevationEstimator.fit: val_fraction must be in [0, 1), "
                       f"got {val_fraction}")
    if hidden < 1 or steps < 1:
      raise ValueError(f"ElevationEstimator.fit: hidden and steps must be positive, "
                       f"got {hidden} and {steps}")

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = int(round(val_fraction * len(x)))
    if len(x) - n_val < 2:
      raise ValueError(f"ElevationEstimator.fit: needs at least 2 training rows, "
                       f"got {len(x)} rows with {n_val} held out")
    val, train = order[:n_val], order[n_val:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std < 1e-6, 1.0, std).astype(np.float32)

    module = ElevationMLP(hidden=hidden)
    init_key, batch_key = jax.random.split(jax.random.key(seed))
    x_train = jnp.asarray((x[train] - mean) / std)
    e_train = jnp.asarray(e[train])
    params = module.init(init_key, x_train[:1])["params"]
    schedule = optax.cosine_decay_schedule(lr, steps)
    kernels_only = lambda p: jax.tree_util.tree_map_with_path(  # pylint: disable=g-long-lambda
        lambda path, _: path[-1].key == "kernel", p)
    optimiser = optax.adamw(schedule, weight_decay=weight_decay, mask=kernels_only)
    opt_state = optimiser.init(params)
    n_train = len(train)
    batch = n_train if batch_size is None or batch_size >= n_train else int(batch_size)

    def loss_fn(params, xb, eb):
      return jnp.mean(jnp.square(module.apply({"params": params}, xb) - eb))

    @jax.jit
    def train_step(params, opt_state, key, x_all, e_all):
      if batch < n_train:
        idx = jax.random.choice(key, n_train, (batch,), replace=False)
        xb, eb = x_all[idx], e_all[idx]
      else:
        xb, eb = x_all, e_all
      loss, grads = jax.value_and_grad(loss_fn)(params, xb, eb)
      updates, opt_state = optimiser.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    loss = jnp.nan
    for step in range(steps):
      params, opt_state, loss = train_step(
          params, opt_state, jax.random.fold_in(batch_key, step), x_train, e_train)

    self.hidden, self.params, self.mean, self.std = hidden, params, mean, std
    train_err = _abs_error_deg(self.predict(x[train]), e[train])
    report = {
        "n": int(len(x)), "n_train": int(n_train), "n_val": int(n_val),
        "feature_dim": int(x.shape[1]),
        "hidden": int(hidden), "steps": int(steps), "lr": float(lr),
        "weight_decay": float(weight_decay),
        "batch_size": None if batch == n_train else batch,
        "seed": int(seed), "val_fraction": float(val_fraction),
        "final_train_loss": float(loss),
        "train_mae_deg": float(train_err.mean()),
        "train_median_ae_deg": float(np.median(train_err)),
        "val_mae_deg": None, "val_median_ae_deg": None, "val_mean_baseline_mae_deg": None,
    }
    if n_val:
      val_err = _abs_error_deg(self.predict(x[val]), e[val])
      baseline = _abs_error_deg(np.full(n_val, e[train].mean()), e[val])
      report.update(val_mae_deg=float(val_err.mean()),
                    val_median_ae_deg=float(np.median(val_err)),
                    val_mean_baseline_mae_deg=float(baseline.mean()))
    self.report = report
    return report

  def predict(self, features: Any) -> np.ndarray:
    """Elevations of the rows.

    Args:
      features: ``[N, D]``, D the fitted feature dim.

    Returns:
      ``[N]`` float32 radians in ``(-pi/2, pi/2)``.
    """
    if self.params is None:
      raise ValueError("ElevationEstimator.predict: the estimator is not fitted "
                       "(call fit or load)")
    x = _check_features("ElevationEstimator.predict", features, self.feature_dim)
    return np.asarray(_predict(ElevationMLP(hidden=self.hidden), self.params,
                               self.mean, self.std, x))

  def save(self, directory: str | os.PathLike) -> None:
    """Writes ``params.npz`` and ``elevation.json`` into ``directory`` (made if missing)."""
    if self.params is None:
      raise ValueError("ElevationEstimator.save: the estimator is not fitted")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    arrays = {f"{layer}/{name}": np.asarray(self.params[layer][name])
              for layer in _LAYERS for name in ("kernel", "bias")}
    np.savez(os.path.join(directory, _PARAMS_FILE), **arrays)
    config = {
        "format": _FORMAT,
        "architecture": {
            "feature_dim": self.feature_dim, "hidden": self.hidden, "hidden_layers": 2,
            "activation": "gelu (exact, erf)", "output": "(pi/2) tanh, radians",
        },
        # float32 -> Python float -> JSON -> float32 is exact.
        "scaler": {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]},
        "report": self.report,
    }
    with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=1)
      f.write("\n")

  @classmethod
  def load(cls, directory: str | os.PathLike, *,
           feature_dim: int | None = None) -> ElevationEstimator:
    """Loads an estimator saved by ``save`` (no pickle).

    Args:
      directory: the folder ``save`` wrote.
      feature_dim: if given, the D the caller's features have; an estimator
        fitted on another D is refused.

    Raises:
      ValueError: one line, when a file is missing or not ours, or a shape or
        the feature dim does not match.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, _CONFIG_FILE)
    try:
      with open(config_path) as f:
        config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"ElevationEstimator.load: cannot read {config_path} "
                       f"({type(e).__name__})") from None
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
      raise ValueError(f"ElevationEstimator.load: {config_path} is not a {_FORMAT} file")
    arch = config["architecture"]
    dim, hidden = int(arch["feature_dim"]), int(arch["hidden"])
    if feature_dim is not None and dim != feature_dim:
      raise ValueError(f"ElevationEstimator.load: {directory} was fitted on {dim}-D "
                       f"features, expected {feature_dim}-D")
    expected = {"Dense_0": (dim, hidden), "Dense_1": (hidden, hidden), "Dense_2": (hidden, 1)}
    params = {}
    with np.load(os.path.join(directory, _PARAMS_FILE), allow_pickle=False) as arrays:
      for layer, shape in expected.items():
        kernel = arrays.get(f"{layer}/kernel")
        bias = arrays.get(f"{layer}/bias")
        if (kernel is None or bias is None or kernel.shape != shape
            or bias.shape != shape[1:]):
          raise ValueError(f"ElevationEstimator.load: {directory}/{_PARAMS_FILE} lacks "
                           f"{layer} of kernel shape {shape}")
        params[layer] = {"kernel": jnp.asarray(kernel, jnp.float32),
                         "bias": jnp.asarray(bias, jnp.float32)}
    mean = np.asarray(config["scaler"]["mean"], np.float32)
    std = np.asarray(config["scaler"]["std"], np.float32)
    if mean.shape != (dim,) or std.shape != (dim,):
      raise ValueError(f"ElevationEstimator.load: {config_path} scaler statistics are not "
                       f"[{dim}]")
    est = cls()
    est.hidden, est.params, est.mean, est.std = hidden, params, mean, std
    est.report = config.get("report")
    return est
