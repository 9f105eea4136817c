"""Deterministic (and DDIM-stochastic) samplers over a discrete schedule.

Both samplers equal diffusers' schedulers step for step (float32 rounding
apart), with the model-agnostic contract

    model_fn(x_t [B, ...] float32, t [B] int32) -> [B, ...] model output

in the schedule's ``prediction_type``. Timesteps and ``num_steps`` are static
(numpy); the loops are ``lax.scan`` so ``model_fn`` is traced once. The
samplers are traceable, not jitted: jit the caller with the parameters as
arguments so they are not baked in as constants, e.g.

    @jax.jit
    def sample(params, x_T):
      return ddim_sample(lambda x, t: unet.apply(params, x, t, ctx, cond), sched, x_T, 25)

Sampling is done in float32 whatever the dtype of ``x_T``.

Both also take ``known``: parts of the sample that are given (e.g. a video's
first frame). Before every model call those parts of ``x_t`` are replaced by
the given clean values noised to the step's level with fixed noise,
``sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise`` (the replacement method of Ho et al.
2022, "Video Diffusion Models"), so the model sees them as it saw them in
training, and the result holds them exactly.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax.diffusion.schedule import Schedule, eps_from_output, x0_from_output

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ("trailing", "leading", "linspace")
# diffusers' DPMSolverMultistepScheduler replaces ᾱ_{T-1} = 0 of a zero-terminal
# SNR schedule by this (float16's smallest subnormal) so that the first sigma
# (~4096) and log-SNR are finite.
DPM_MIN_ALPHA_CUMPROD = 2.0**-24


class Known(NamedTuple):
  """Given parts of a sample: ``where(mask, x0, ...)``, noised with ``noise``."""
  x0: jax.Array  # [B, ...] clean values
  mask: jax.Array  # bool, broadcastable to [B, ...]: True where x0 holds
  noise: jax.Array  # [B, ...] the fixed noise they are noised with


def _replace(known: Optional[Known], x: jax.Array, alpha, sigma) -> jax.Array:
  if known is None:
    return x
  return jnp.where(known.mask, alpha * known.x0 + sigma * known.noise, x)


def _finish(known: Optional[Known], x: jax.Array) -> jax.Array:
  return x if known is None else jnp.where(known.mask, known.x0.astype(x.dtype), x)


def timesteps_for(s: Schedule, num_steps: int, spacing: str = "trailing", *,
                  steps_offset: int = 0, solver: str = "ddim") -> np.ndarray:
  """The model-evaluation timesteps of a sampler, noisiest first.

  Equal to diffusers' ``set_timesteps`` of ``DDIMScheduler`` (``solver="ddim"``)
  or ``DPMSolverMultistepScheduler`` (``solver="dpm_solver"``). The two differ
  for ``"linspace"``/``"leading"``: DPM-Solver spaces ``num_steps + 1`` points
  and drops the last (its final step lands on clean data, not on ``t = 0``).
  Only ``"trailing"`` starts at ``t = T - 1``, the step where a zero-terminal-SNR
  schedule is pure noise (Lin et al. 2023, Table 2).

  Args:
    s: the schedule (only ``num_train_timesteps`` is used).
    num_steps: number of model evaluations.
    spacing: ``"trailing"``, ``"leading"`` or ``"linspace"``.
    steps_offset: added to ``"leading"`` timesteps (diffusers' ``steps_offset``).
    solver: ``"ddim"`` or ``"dpm_solver"``.

  Returns:
    ``[num_steps]`` int64 numpy timesteps, decreasing.
  """
  total = s.num_train_timesteps
  if not 0 < num_steps <= total:
    raise ValueError(f"num_steps must be in [1, {total}], got {num_steps}")
  if solver not in ("ddim", "dpm_solver"):
    raise ValueError(f"solver must be 'ddim' or 'dpm_solver', got {solver!r}")
  if spacing == "trailing":
    ratio = total / num_steps
    return np.round(np.arange(total, 0, -ratio)).astype(np.int64) - 1
  points = num_steps + (solver == "dpm_solver")
  if spacing == "linspace":
    ts = np.linspace(0, total - 1, points).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    ts = (np.arange(points) * (total // points)).round()[::-1].astype(np.int64) + steps_offset
  else:
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
  return ts[:num_steps].copy()


def _batch_t(t: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.full((x.shape[0],), t, jnp.int32)


def ddim_sample(model_fn: ModelFn,
                s: Schedule,
                x_T: jax.Array,
                num_steps: int,
                *,
                eta: float = 0.0,
                key: Optional[jax.Array] = None,
                spacing: str = "trailing",
                steps_offset: int = 0,
                set_alpha_to_one: bool = True,
                clip_x0: Optional[float] = None,
                known: Optional[Known] = None,
                return_trajectory: bool = False):
  """DDIM (Song et al. 2021), equal to diffusers' ``DDIMScheduler.step`` loop.

  Matches ``DDIMScheduler(..., timestep_spacing=spacing, steps_offset,
  set_alpha_to_one, clip_sample=clip_x0 is not None,
  clip_sample_range=clip_x0, rescale_betas_zero_snr)`` with
  ``use_clipped_model_output=False``. Two diffusers semantics are kept on
  purpose:

  * The step from ``t`` goes to ``t - T // num_steps`` (not to the next entry of
    the timestep list; they differ only when ``num_steps`` does not divide T
    or for ``"linspace"``).
  * The last step goes to ``ᾱ = 1`` when ``set_alpha_to_one`` (diffusers'
    default; the result is that step's x0 estimate) or to ``ᾱ_0`` otherwise
    (Stable Diffusion's released configs, which leave noise of std
    ``sqrt(1 - ᾱ_0)`` ≈ 0.03 in the output).

  Epsilon-prediction cannot start at ``ᾱ = 0``; that combination raises.

  Args:
    model_fn: ``(x_t [B, ...], t [B] int32) -> [B, ...]``.
    s: the schedule.
    x_T: ``[B, ...]`` initial noise (static shape).
    num_steps: number of model evaluations (static).
    eta: 0 for deterministic DDIM, 1 for DDPM-like ancestral noise.
    key: PRNG key, needed when ``eta > 0``; step ``i`` draws its noise as
      ``jax.random.normal(jax.random.fold_in(key, i), x_T.shape)``.
    spacing, steps_offset: see ``timesteps_for``.
    set_alpha_to_one: the final ``ᾱ_prev`` is 1 (else ``ᾱ_0``).
    clip_x0: clamp the x0 estimate to ``[-clip_x0, clip_x0]`` (None: no clip).
    known: given parts of the sample (see the module docstring), or None.
    return_trajectory: also return ``{"x": [num_steps, B, ...] samples after
      each step, "x0": [num_steps, B, ...] x0 estimates, "t": [num_steps]}``.

  Returns:
    ``[B, ...]`` float32 samples (and the trajectory if asked).
  """
  ts = timesteps_for(s, num_steps, spacing, steps_offset=steps_offset, solver="ddim")
  total = s.num_train_timesteps
  if s.prediction_type == "epsilon" and s.zero_terminal_snr and ts[0] == total - 1:
    raise ValueError("epsilon-prediction is undefined at ᾱ = 0 (zero terminal SNR, t = T - 1); "
                     "use v_prediction or a spacing that does not start at T - 1")
  stochastic = not (isinstance(eta, (int, float)) and eta == 0)
  if stochastic and key is None:
    raise ValueError("ddim_sample with eta > 0 needs a key")

  prev = ts - total // num_steps
  ac = s.alphas_cumprod.astype(jnp.float32)
  final = jnp.float32(1.0) if set_alpha_to_one else ac[0]
  a_t = ac[ts]
  a_prev = jnp.where(jnp.asarray(prev >= 0), ac[np.maximum(prev, 0)], final)
  variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  std = eta * jnp.sqrt(variance)
  # Never negative in exact arithmetic; the clamp keeps rounding from giving NaN.
  direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0))

  def step(x, inputs):
    i, t, a, ap, sd, dc = inputs
    alpha, sigma = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    x = _replace(known, x, alpha, sigma)
    out = model_fn(x, _batch_t(t, x)).astype(jnp.float32)
    x0 = x0_from_output(s.prediction_type, x, out, alpha, sigma)
    eps = eps_from_output(s.prediction_type, x, out, alpha, sigma)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    x_prev = jnp.sqrt(ap) * x0 + dc * eps
    if stochastic:
      x_prev = x_prev + sd * jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
    return x_prev, ((x_prev, x0) if return_trajectory else None)

  xs = (jnp.arange(len(ts)), jnp.asarray(ts, jnp.int32), a_t, a_prev, std, direction)
  x, traj = jax.lax.scan(step, x_T.astype(jnp.float32), xs)
  x = _finish(known, x)
  if return_trajectory:
    return x, {"x": traj[0], "x0": traj[1], "t": jnp.asarray(ts, jnp.int32)}
  return x


def dpm_solver_pp_sample(model_fn: ModelFn,
                         s: Schedule,
                         x_T: jax.Array,
                         num_steps: int,
                         *,
                         order: int = 2,
                         spacing: str = "trailing",
                         steps_offset: int = 0,
                         lower_order_final: bool = True,
                         final_sigma: str = "zero",
                         known: Optional[Known] = None,
                         return_trajectory: bool = False):
  """Multistep DPM-Solver++ (Lu et al. 2022) in data-prediction form.

  Equals diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
  solver_order=order, solver_type="midpoint", timestep_spacing=spacing,
  final_sigmas_type=final_sigma, lower_order_final, rescale_betas_zero_snr)``
  with no Karras/Lu sigmas and no thresholding. What that means here:

  * Zero terminal SNR: ``ᾱ = 0`` is replaced by ``2**-24`` (sigma ≈ 4096, as
    diffusers does), so the first step's x0 estimate is ``≈ -v`` for v-models
    and finite (but meaningless) for epsilon-models.
  * ``final_sigma="zero"`` (default): the last step lands on sigma = 0 and is
    always first order, so the output is exactly the last x0 estimate.
    ``"sigma_min"``: the last step lands on ``ᾱ_0``; it is first order only
    when ``lower_order_final`` and fewer than 15 steps.
  * The first step is first order (no history yet); the others are 2M.

  Args:
    model_fn: ``(x_t [B, ...], t [B] int32) -> [B, ...]``.
    s: the schedule.
    x_T: ``[B, ...]`` initial noise (static shape).
    num_steps: number of model evaluations (static).
    order: 1 (DPM-Solver++ 1, i.e. DDIM in log-SNR) or 2 (2M).
    spacing, steps_offset: see ``timesteps_for`` (``solver="dpm_solver"``).
    lower_order_final: see above.
    final_sigma: ``"zero"`` or ``"sigma_min"``.
    known: given parts of the sample (see the module docstring), or None.
    return_trajectory: also return ``{"x", "x0", "t"}`` as ``ddim_sample``.

  Returns:
    ``[B, ...]`` float32 samples (and the trajectory if asked).
  """
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2, got {order}")
  if final_sigma not in ("zero", "sigma_min"):
    raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
  ts = timesteps_for(s, num_steps, spacing, steps_offset=steps_offset, solver="dpm_solver")
  n = len(ts)

  ac = s.alphas_cumprod.astype(jnp.float32)
  ac = jnp.where(ac == 0, DPM_MIN_ALPHA_CUMPROD, ac)
  ratio = jnp.sqrt((1.0 - ac) / ac)  # diffusers' "sigma": sqrt(1/snr)
  last = jnp.float32(0.0) if final_sigma == "zero" else ratio[0]
  ratios = jnp.concatenate([ratio[ts], last[None]])  # [n + 1]
  alpha = 1.0 / jnp.sqrt(ratios**2 + 1.0)
  sigma = ratios * alpha
  lam = jnp.log(alpha) - jnp.log(sigma)  # +inf at sigma = 0
  h = lam[1:] - lam[:-1]  # [n]
  h_prev = lam[:-1] - jnp.concatenate([lam[:1], lam[:-2]])  # [n]; unused at i = 0
  coef_x = sigma[1:] / sigma[:-1]
  coef_x0 = -alpha[1:] * (jnp.exp(-h) - 1.0)

  index = np.arange(n)
  first_order_last = (index == n - 1) & (final_sigma == "zero" or (lower_order_final and n < 15))
  second = (order == 2) & (index >= 1) & ~first_order_last
  # 2M midpoint: D1 = (m0 - m1) * h / h_prev enters with half of coef_x0.
  coef_diff = jnp.where(second, 0.5 * coef_x0 * h / h_prev, 0.0)

  def step(carry, inputs):
    x, x0_prev = carry
    t, a, sg, cx, cx0, cd = inputs
    x = _replace(known, x, a, sg)
    out = model_fn(x, _batch_t(t, x)).astype(jnp.float32)
    x0 = x0_from_output(s.prediction_type, x, out, a, sg)
    x_next = cx * x + cx0 * x0 + cd * (x0 - x0_prev)
    return (x_next, x0), ((x_next, x0) if return_trajectory else None)

  x_T = x_T.astype(jnp.float32)
  xs = (jnp.asarray(ts, jnp.int32), alpha[:-1], sigma[:-1], coef_x, coef_x0, coef_diff)
  (x, _), traj = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)), xs)
  x = _finish(known, x)
  if return_trajectory:
    return x, {"x": traj[0], "x0": traj[1], "t": jnp.asarray(ts, jnp.int32)}
  return x
