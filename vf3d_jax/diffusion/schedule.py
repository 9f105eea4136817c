"""Discrete-time variance-preserving diffusion: schedules, conversions, loss.

Notation (Ho et al. 2020; Salimans & Ho 2022): with ``a = alphas_cumprod[t]``
(``ᾱ_t``),

* ``x_t = sqrt(a) * x0 + sqrt(1 - a) * eps``              (forward process)
* ``v   = sqrt(a) * eps - sqrt(1 - a) * x0``              (velocity target)
* ``x0  = sqrt(a) * x_t - sqrt(1 - a) * v``
* ``eps = sqrt(a) * v + sqrt(1 - a) * x_t``
* ``snr = a / (1 - a)``

Timesteps are integers in ``[0, T)``; ``t = T - 1`` is the noisiest. The beta
schedules and the zero-terminal-SNR rescale are those of diffusers'
``DDIMScheduler`` (``beta_schedule`` names: ``"cosine"`` here is diffusers'
``"squaredcos_cap_v2"``), computed in float64 and stored as float32.

Zero terminal SNR (Lin et al. 2023) makes ``ᾱ_{T-1} = 0`` exactly, so
``x_{T-1}`` is pure noise. There the v-parameterisation stays well defined
(``x0 = -v``) while epsilon-prediction is not: ``predict_x0`` for an epsilon
model divides by ``sqrt(ᾱ) = 0`` and returns non-finite values (as diffusers
does). Pair zero terminal SNR with ``prediction_type="v_prediction"``.

Every function broadcasts a per-example timestep ``t: [B]`` (or a scalar)
against samples ``[B, ...]`` (videos are ``[B, F, H, W, C]``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
# Largest beta of the cosine schedule (Nichol & Dhariwal 2021), as in diffusers.
COSINE_MAX_BETA = 0.999


@flax.struct.dataclass
class Schedule:
  """A discrete noise schedule; a pytree whose arrays can be jit arguments."""
  # [T] float32 per-step variances beta_t.
  betas: jax.Array
  # [T] float32 cumulative products ᾱ_t = prod_{s<=t} (1 - beta_s).
  alphas_cumprod: jax.Array
  # T, the number of training timesteps.
  num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
  # What the model predicts: "epsilon" or "v_prediction".
  prediction_type: str = flax.struct.field(pytree_node=False, default="v_prediction")
  # Whether ᾱ_{T-1} == 0 (betas rescaled to zero terminal SNR).
  zero_terminal_snr: bool = flax.struct.field(pytree_node=False, default=False)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales betas so that the terminal SNR is zero (Lin et al. 2023, Alg. 1).

  Shifts ``sqrt(ᾱ)`` so its last value is 0 and scales it so its first value is
  unchanged; SNR at ``t = 0`` is therefore preserved.

  Args:
    betas: ``[T]`` betas.

  Returns:
    ``[T]`` float64 betas with ``betas[-1] == 1`` (so ``ᾱ_{T-1} == 0``).
  """
  betas = np.asarray(betas, np.float64)
  sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  alphas_cumprod = sqrt_ab**2
  alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
  return 1.0 - alphas


def _cosine_betas(num_train_timesteps: int) -> np.ndarray:
  def alpha_bar(u):
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  t = num_train_timesteps
  return np.array([min(1.0 - alpha_bar((i + 1) / t) / alpha_bar(i / t), COSINE_MAX_BETA)
                   for i in range(t)], np.float64)


def make_schedule(num_train_timesteps: int = 1000,
                  beta_schedule: str = "scaled_linear",
                  beta_start: float = 0.00085,
                  beta_end: float = 0.012,
                  zero_terminal_snr: bool = False,
                  prediction_type: str = "v_prediction") -> Schedule:
  """Builds a schedule (the defaults are Stable Diffusion's betas).

  Args:
    num_train_timesteps: T.
    beta_schedule: ``"linear"`` (betas linear in ``[beta_start, beta_end]``),
      ``"scaled_linear"`` (sqrt(betas) linear) or ``"cosine"`` (Nichol &
      Dhariwal; ``beta_start``/``beta_end`` unused).
    beta_start, beta_end: first and last beta of the linear schedules.
    zero_terminal_snr: rescale betas so ``ᾱ_{T-1} = 0``.
    prediction_type: ``"epsilon"`` or ``"v_prediction"``.

  Returns:
    The ``Schedule``; arrays computed in float64, stored float32.
  """
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
  if beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
  elif beta_schedule == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64)**2
  elif beta_schedule == "cosine":
    betas = _cosine_betas(num_train_timesteps)
  else:
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return Schedule(
      betas=jnp.asarray(betas, jnp.float32),
      alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
      num_train_timesteps=num_train_timesteps,
      prediction_type=prediction_type,
      zero_terminal_snr=zero_terminal_snr)


def _expand(coef: jax.Array, like: jax.Array) -> jax.Array:
  """``[B]`` (or scalar) -> ``[B, 1, ..., 1]`` broadcastable against ``like``."""
  coef = jnp.asarray(coef)
  return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def alpha_bar(s: Schedule, t: jax.Array) -> jax.Array:
  """``ᾱ_t``: ``t [...] int`` -> ``[...] float32``."""
  return s.alphas_cumprod[t]


def snr(s: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio ``ᾱ_t / (1 - ᾱ_t)``: ``t [...] int`` -> ``[...]``.

  0 at ``t = T - 1`` under zero terminal SNR.
  """
  a = alpha_bar(s, t)
  return a / (1.0 - a)


def add_noise(s: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """Forward process ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise``.

  Args:
    x0: ``[B, ...]`` clean samples.
    noise: ``[B, ...]`` standard normal noise.
    t: ``[B]`` int timesteps (or a scalar).

  Returns:
    ``[B, ...]`` noisy samples, in the dtype of ``x0``.
  """
  a = _expand(alpha_bar(s, t), x0)
  return (jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise).astype(x0.dtype)


def velocity(s: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """``v = sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0``; shapes as ``add_noise``."""
  a = _expand(alpha_bar(s, t), x0)
  return (jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0).astype(x0.dtype)


def training_target(s: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """What the model should output at ``x_t``: ``noise`` or ``v``; ``[B, ...]``."""
  if s.prediction_type == "epsilon":
    return noise
  return velocity(s, x0, noise, t)


def x0_from_output(prediction_type: str, x_t: jax.Array, model_out: jax.Array,
                   alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """``x0`` from a model output, given ``alpha = sqrt(ᾱ)`` and ``sigma = sqrt(1 - ᾱ)``.

  Epsilon: ``(x_t - sigma eps) / alpha``, non-finite at ``alpha = 0``.
  V: ``alpha x_t - sigma v``, exact everywhere (``-v`` at ``alpha = 0``).
  ``alpha``/``sigma`` broadcast against ``x_t``.
  """
  if prediction_type == "epsilon":
    return (x_t - sigma * model_out) / alpha
  if prediction_type == "v_prediction":
    return alpha * x_t - sigma * model_out
  raise ValueError(f"unknown prediction_type {prediction_type!r}")


def eps_from_output(prediction_type: str, x_t: jax.Array, model_out: jax.Array,
                    alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """``eps`` from a model output (finite for both types); as ``x0_from_output``."""
  if prediction_type == "epsilon":
    return model_out
  if prediction_type == "v_prediction":
    return alpha * model_out + sigma * x_t
  raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predict_x0(s: Schedule, x_t: jax.Array, model_out: jax.Array, t: jax.Array) -> jax.Array:
  """Clean-sample estimate from the model output.

  Args:
    x_t: ``[B, ...]`` noisy samples.
    model_out: ``[B, ...]`` model output (``s.prediction_type``).
    t: ``[B]`` int timesteps (or a scalar).

  Returns:
    ``[B, ...]`` x0 estimate. For epsilon-prediction at ``ᾱ_t = 0`` (the last
    step of a zero-terminal-SNR schedule) this is undefined and non-finite.
  """
  a = _expand(alpha_bar(s, t), x_t)
  return x0_from_output(s.prediction_type, x_t, model_out, jnp.sqrt(a), jnp.sqrt(1.0 - a))


def predict_eps(s: Schedule, x_t: jax.Array, model_out: jax.Array, t: jax.Array) -> jax.Array:
  """Noise estimate from the model output; shapes as ``predict_x0``."""
  a = _expand(alpha_bar(s, t), x_t)
  return eps_from_output(s.prediction_type, x_t, model_out, jnp.sqrt(a), jnp.sqrt(1.0 - a))


def loss_weights(s: Schedule, t: jax.Array, weighting: str = "none",
                 min_snr_gamma: float = 5.0) -> jax.Array:
  """Per-example loss weights ``[B]`` for timesteps ``t [B]``.

  ``"min_snr"`` is Min-SNR-gamma (Hang et al. 2023) written for the target
  being regressed: ``min(snr, γ) / snr`` for epsilon (evaluated as
  ``γ / max(snr, γ)``, which is 1 at ``snr = 0`` instead of 0/0) and
  ``min(snr, γ) / (snr + 1)`` for v (0 at zero terminal SNR).
  """
  if weighting == "none":
    return jnp.ones(jnp.shape(t), jnp.float32)
  if weighting != "min_snr":
    raise ValueError(f"weighting must be 'none' or 'min_snr', got {weighting!r}")
  ratio = snr(s, t)
  if s.prediction_type == "epsilon":
    return min_snr_gamma / jnp.maximum(ratio, min_snr_gamma)
  return jnp.minimum(ratio, min_snr_gamma) / (ratio + 1.0)


def diffusion_loss(s: Schedule,
                   model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                   x0: jax.Array,
                   key: jax.Array,
                   *,
                   weighting: str = "none",
                   min_snr_gamma: float = 5.0,
                   mask: Optional[jax.Array] = None,
                   timesteps: Optional[jax.Array] = None,
                   noise: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, Any]]:
  """Denoising regression loss with uniformly sampled timesteps.

  Args:
    s: the schedule (its ``prediction_type`` decides the target).
    model_fn: ``(x_t [B, ...], t [B] int32) -> [B, ...]`` model output.
    x0: ``[B, ...]`` clean samples (e.g. video latents ``[B, F, H, W, C]``).
    key: PRNG key for the timesteps and the noise.
    weighting: ``"none"`` or ``"min_snr"`` (see ``loss_weights``).
    min_snr_gamma: γ of Min-SNR weighting.
    mask: optional ``[B, ...]`` array broadcastable to ``x0`` (e.g.
      ``[B, F, 1, 1, 1]`` to skip conditioning frames); each example's squared
      error is averaged over its masked elements only.
    timesteps: optional ``[B]`` int override of the sampled timesteps.
    noise: optional ``[B, ...]`` override of the sampled noise.

  Returns:
    ``(loss, aux)``: the batch mean of the weighted per-example losses (float32
    scalar) and ``aux`` with ``per_example_loss [B]`` (unweighted),
    ``weights [B]`` and ``timesteps [B]``.
  """
  batch = x0.shape[0]
  key_t, key_noise = jax.random.split(key)
  if timesteps is None:
    timesteps = jax.random.randint(key_t, (batch,), 0, s.num_train_timesteps)
  timesteps = jnp.asarray(timesteps, jnp.int32)
  if noise is None:
    noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
  x_t = add_noise(s, x0, noise, timesteps)
  target = training_target(s, x0, noise, timesteps).astype(jnp.float32)
  out = model_fn(x_t, timesteps).astype(jnp.float32)
  sq_err = jnp.square(out - target)
  axes = tuple(range(1, x0.ndim))
  if mask is None:
    per_example = jnp.mean(sq_err, axis=axes)
  else:
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x0.shape)
    # Examples whose mask is all zero contribute 0 rather than 0/0.
    per_example = jnp.sum(sq_err * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)
  weights = loss_weights(s, timesteps, weighting, min_snr_gamma)
  loss = jnp.mean(weights * per_example)
  return loss, {"per_example_loss": per_example, "weights": weights, "timesteps": timesteps}
