"""DDIM and DPM-Solver++ against diffusers' schedulers, step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.diffusion import samplers
from vf3d_jax.diffusion import schedule as sched

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 4, 2)  # [B, F, H, W, C]
BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _ours(prediction_type, zero_snr):
  return sched.make_schedule(1000, "scaled_linear", 0.00085, 0.012, zero_terminal_snr=zero_snr,
                             prediction_type=prediction_type)


# A toy "model": an analytic function of x_t and t, written once for any array
# namespace (jnp here, torch for diffusers) so both sides see the same function.
def _toy_model(xp, x, t):
  tt = t.reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
  return 0.8 * xp.tanh(x) * xp.cos(3.0 * tt) + 0.3 * xp.sin(2.0 * x + 5.0 * tt) - 0.1 * tt


def _jnp_model(x, t):
  return _toy_model(jnp, x, t.astype(jnp.float32))


def _torch_model(x, t):
  return _toy_model(torch, x, torch.full((x.shape[0],), float(t)))


def _noise(seed=0):
  return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _relative_error(ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  return np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1.0)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 10, 25, 50])
def test_timesteps_match_diffusers(spacing, num_steps):
  s = _ours("v_prediction", True)
  ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
  ddim.set_timesteps(num_steps)
  np.testing.assert_array_equal(
      samplers.timesteps_for(s, num_steps, spacing, steps_offset=1), ddim.timesteps.numpy())
  dpm = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1)
  dpm.set_timesteps(num_steps)
  np.testing.assert_array_equal(
      samplers.timesteps_for(s, num_steps, spacing, steps_offset=1, solver="dpm_solver"),
      dpm.timesteps.numpy())
  if spacing == "trailing":
    assert samplers.timesteps_for(s, num_steps, spacing)[0] == 999


def _diffusers_loop(scheduler, x, num_steps, noises=None, eta=0.0, known=None):
  """diffusers' step loop; ``known=(x0, mask, noise)`` replaces those values first each step."""
  scheduler.set_timesteps(num_steps)
  x = torch.from_numpy(x)
  xs = []
  for i, t in enumerate(scheduler.timesteps):
    if known is not None:
      x0, mask, noise = (torch.from_numpy(np.asarray(a)) for a in known)
      noised = scheduler.add_noise(x0, noise, torch.full((x.shape[0],), int(t)))
      x = torch.where(mask, noised, x)
    out = _torch_model(x, int(t))
    kwargs = {}
    if noises is not None:
      kwargs = dict(eta=eta, variance_noise=torch.from_numpy(noises[i]))
    x = scheduler.step(out, t, x, **kwargs).prev_sample
    xs.append(x.numpy())
  return np.stack(xs)


DDIM_CASES = [  # (prediction_type, zero_snr, spacing, set_alpha_to_one, clip)
    ("v_prediction", True, "trailing", True, None),
    ("v_prediction", False, "trailing", False, None),
    ("v_prediction", True, "linspace", True, 1.0),
    ("epsilon", False, "leading", False, None),
    ("epsilon", True, "leading", True, None),
]


# 7 steps do not divide T: diffusers then steps from t to t - T // 7, not to the
# next listed timestep.
@pytest.mark.parametrize("num_steps", [7, 10, 25])
@pytest.mark.parametrize("prediction_type,zero_snr,spacing,alpha_one,clip", DDIM_CASES)
def test_ddim_matches_diffusers(prediction_type, zero_snr, spacing, alpha_one, clip, num_steps):
  ref = diffusers.DDIMScheduler(**BETAS, prediction_type=prediction_type,
                                rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing,
                                set_alpha_to_one=alpha_one, clip_sample=clip is not None,
                                clip_sample_range=clip or 1.0, steps_offset=1)
  x_T = _noise()
  expected = _diffusers_loop(ref, x_T, num_steps)
  s = _ours(prediction_type, zero_snr)
  run = jax.jit(lambda x: samplers.ddim_sample(
      _jnp_model, s, x, num_steps, spacing=spacing, steps_offset=1, set_alpha_to_one=alpha_one,
      clip_x0=clip, return_trajectory=True))
  final, traj = run(jnp.asarray(x_T))
  assert traj["x"].shape == (num_steps,) + SHAPE
  np.testing.assert_array_equal(traj["x"][-1], final)
  errors = [_relative_error(a, b) for a, b in zip(traj["x"], expected)]
  assert max(errors) < 1e-5, errors  # measured <= 1.3e-6


def test_ddim_with_eta_matches_diffusers_with_the_same_noise():
  num_steps, eta = 10, 0.7
  key = jax.random.key(42)
  noises = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), SHAPE))
                     for i in range(num_steps)])
  ref = diffusers.DDIMScheduler(**BETAS, prediction_type="v_prediction",
                                rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                clip_sample=False)
  x_T = _noise(1)
  expected = _diffusers_loop(ref, x_T, num_steps, noises=noises, eta=eta)
  s = _ours("v_prediction", True)
  _, traj = jax.jit(lambda x, k: samplers.ddim_sample(
      _jnp_model, s, x, num_steps, eta=eta, key=k, return_trajectory=True))(jnp.asarray(x_T), key)
  errors = [_relative_error(a, b) for a, b in zip(traj["x"], expected)]
  assert max(errors) < 1e-5, errors
  # The noise matters: eta = 0 gives something else.
  deterministic = samplers.ddim_sample(_jnp_model, s, jnp.asarray(x_T), num_steps)
  assert _relative_error(deterministic, expected[-1]) > 1e-2


DPM_CASES = [  # (prediction_type, zero_snr, spacing, final_sigma)
    ("v_prediction", True, "trailing", "zero"),
    ("v_prediction", False, "trailing", "zero"),
    ("v_prediction", True, "linspace", "sigma_min"),
    ("epsilon", False, "linspace", "zero"),
    ("epsilon", True, "trailing", "zero"),  # finite thanks to the 2**-24 clamp
]


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("prediction_type,zero_snr,spacing,final_sigma", DPM_CASES)
def test_dpm_solver_pp_matches_diffusers(prediction_type, zero_snr, spacing, final_sigma,
                                         num_steps):
  ref = diffusers.DPMSolverMultistepScheduler(
      **BETAS, algorithm_type="dpmsolver++", solver_order=2, prediction_type=prediction_type,
      rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing, final_sigmas_type=final_sigma)
  x_T = _noise(2)
  expected = _diffusers_loop(ref, x_T, num_steps)
  s = _ours(prediction_type, zero_snr)
  run = jax.jit(lambda x: samplers.dpm_solver_pp_sample(
      _jnp_model, s, x, num_steps, spacing=spacing, final_sigma=final_sigma,
      return_trajectory=True))
  final, traj = run(jnp.asarray(x_T))
  np.testing.assert_array_equal(traj["x"][-1], final)
  assert np.all(np.isfinite(final))
  errors = [_relative_error(a, b) for a, b in zip(traj["x"], expected)]
  # Measured <= 1.3e-6 (float32 rounding), also where epsilon/zero-SNR divides
  # by sqrt(2**-24) at the first step.
  assert max(errors) < 1e-5, errors


def test_dpm_solver_first_order_matches_diffusers():
  ref = diffusers.DPMSolverMultistepScheduler(
      **BETAS, algorithm_type="dpmsolver++", solver_order=1, prediction_type="v_prediction",
      rescale_betas_zero_snr=True, timestep_spacing="trailing")
  x_T = _noise(3)
  expected = _diffusers_loop(ref, x_T, 10)
  out = samplers.dpm_solver_pp_sample(_jnp_model, _ours("v_prediction", True), jnp.asarray(x_T),
                                      10, order=1)
  assert _relative_error(out, expected[-1]) < 1e-5


def test_epsilon_at_zero_terminal_snr_is_refused_by_ddim():
  with pytest.raises(ValueError, match="epsilon"):
    samplers.ddim_sample(_jnp_model, _ours("epsilon", True), jnp.zeros(SHAPE), 10)


def _point_oracle(s, x0_point):
  """The exact model output when the data distribution is the single point x0."""
  def model_fn(x_t, t):
    a = s.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
    # eps = (x_t - sqrt(a) x0) / sqrt(1 - a); v = sqrt(a) eps - sqrt(1 - a) x0.
    eps = (x_t - jnp.sqrt(a) * x0_point) / jnp.sqrt(1.0 - a)
    if s.prediction_type == "epsilon":
      return eps
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0_point
  return model_fn


@pytest.mark.parametrize("prediction_type,zero_snr", [("v_prediction", True),
                                                      ("epsilon", False)])
def test_exact_model_recovers_the_data_point(prediction_type, zero_snr):
  s = _ours(prediction_type, zero_snr)
  x0_point = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, SHAPE), jnp.float32)
  x_T = jnp.asarray(_noise(4))
  model_fn = _point_oracle(s, x0_point)
  spacing = "trailing" if zero_snr else "leading"
  ddim = samplers.ddim_sample(model_fn, s, x_T, 10, spacing=spacing)
  np.testing.assert_allclose(ddim, x0_point, atol=1e-5)
  dpm = samplers.dpm_solver_pp_sample(model_fn, s, x_T, 10, spacing=spacing)
  np.testing.assert_allclose(dpm, x0_point, atol=1e-5)


def test_gaussian_data_follows_the_probability_flow():
  """Data N(mu, std^2) per element: the exact ODE keeps x_t on a known line.

  With zero terminal SNR ``x_{T-1} = z`` is pure noise and the probability-flow
  ODE gives ``x_t = sqrt(ᾱ_t) mu + sqrt(ᾱ_t std^2 + 1 - ᾱ_t) z``; the model is
  the exact posterior mean, so what remains is discretisation error. Checked
  halfway (t = 499), away from the last step, whose output is the posterior mean
  E[x0 | x_t] rather than a point on the flow. Float64 runs give DDIM 1.3e-3 and
  DPM-Solver++(2M) 2.3e-4 at 50 steps (2M's floor there is the 2**-24 start).
  """
  s = _ours("v_prediction", True)
  mu, std, num_steps = 0.5, 0.3, 50

  def model_fn(x_t, t):
    a = s.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
    x0_mean = mu + jnp.sqrt(a) * std**2 / (a * std**2 + 1 - a) * (x_t - jnp.sqrt(a) * mu)
    return (jnp.sqrt(a) * x_t - x0_mean) / jnp.sqrt(1.0 - a)  # v = (sqrt(a) x_t - x0) / sqrt(1-a)

  z = jnp.asarray(_noise(6))
  _, ddim = samplers.ddim_sample(model_fn, s, z, num_steps, return_trajectory=True)
  _, dpm = samplers.dpm_solver_pp_sample(model_fn, s, z, num_steps, return_trajectory=True)
  k = num_steps // 2  # the state after step k - 1 sits at timestep ts[k]
  t = int(dpm["t"][k])
  assert t == int(ddim["t"][k]) == 499
  a = float(s.alphas_cumprod[t])
  exact = np.sqrt(a) * mu + np.sqrt(a * std**2 + 1 - a) * np.asarray(z)
  ddim_err = float(np.abs(ddim["x"][k - 1] - exact).max())
  dpm_err = float(np.abs(dpm["x"][k - 1] - exact).max())
  assert ddim_err < 3e-3, ddim_err
  assert dpm_err < 5e-4, dpm_err
  assert dpm_err < ddim_err / 3, (dpm_err, ddim_err)


def _known():
  rng = np.random.default_rng(7)
  x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
  mask = np.zeros(SHAPE[:2] + (1, 1, 1), bool)
  mask[0, 0] = True  # frame 0 of the first example is given; the second has none
  noise = rng.standard_normal(SHAPE).astype(np.float32)
  return x0, np.broadcast_to(mask, SHAPE), noise


@pytest.mark.parametrize("solver", ["ddim", "dpm_solver_pp"])
def test_known_frames_are_the_replacement_method(solver):
  """Replacing given values by their noised versions before each step, as a diffusers loop does
  with ``scheduler.add_noise``; the output holds them exactly, the rest follows from them."""
  x0, mask, noise = _known()
  num_steps = 10
  if solver == "ddim":
    ref = diffusers.DDIMScheduler(**BETAS, prediction_type="v_prediction",
                                  rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                  clip_sample=False)
    fn = samplers.ddim_sample
  else:
    ref = diffusers.DPMSolverMultistepScheduler(
        **BETAS, algorithm_type="dpmsolver++", solver_order=2, prediction_type="v_prediction",
        rescale_betas_zero_snr=True, timestep_spacing="trailing")
    fn = samplers.dpm_solver_pp_sample
  x_T = _noise(4)
  expected = _diffusers_loop(ref, x_T, num_steps, known=(x0, mask, noise))
  known = samplers.Known(jnp.asarray(x0), jnp.asarray(mask[:, :, :1, :1, :1]), jnp.asarray(noise))
  s = _ours("v_prediction", True)
  final, traj = jax.jit(lambda x: fn(_jnp_model, s, x, num_steps, known=known,
                                     return_trajectory=True))(jnp.asarray(x_T))
  errors = [_relative_error(a, b) for a, b in zip(traj["x"], expected)]
  assert max(errors) < 1e-5, errors
  final = np.asarray(final)
  np.testing.assert_array_equal(final[mask], x0[mask])
  np.testing.assert_array_equal(final[~mask], np.asarray(traj["x"][-1])[~mask])
  # Through a model that mixes frames, the given values steer the others.
  mixing = lambda x, t: _jnp_model(x, t) + 0.5 * jnp.mean(x, axis=1, keepdims=True)
  plain = np.asarray(fn(mixing, s, jnp.asarray(x_T), num_steps))
  steered = np.asarray(fn(mixing, s, jnp.asarray(x_T), num_steps, known=known))
  assert np.abs(plain[0, 1:] - steered[0, 1:]).max() > 1e-2
  np.testing.assert_allclose(plain[1], steered[1], atol=1e-5)  # the example with nothing given
  # Nothing given at all: exactly the plain sampler.
  nothing = samplers.Known(known.x0, jnp.zeros_like(known.mask), known.noise)
  np.testing.assert_allclose(np.asarray(fn(mixing, s, jnp.asarray(x_T), num_steps,
                                           known=nothing)), plain, atol=1e-5)
