"""Schedules, conversions and the loss against diffusers and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.diffusion import schedule as sched

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# (our beta_schedule, diffusers' name, beta_start, beta_end)
SCHEDULES = [("scaled_linear", "scaled_linear", 0.00085, 0.012),
             ("linear", "linear", 0.0001, 0.02),
             ("cosine", "squaredcos_cap_v2", 0.0001, 0.02)]


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("ours,theirs,start,end", SCHEDULES)
def test_schedule_matches_diffusers(ours, theirs, start, end, zero_snr):
  s = sched.make_schedule(1000, ours, start, end, zero_terminal_snr=zero_snr)
  ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=theirs, beta_start=start,
                                beta_end=end, rescale_betas_zero_snr=zero_snr)
  # diffusers builds the schedule in float32 (a 1000-term float32 cumprod); ours
  # is float64 rounded once. Measured: ᾱ differs by <= 8e-7; betas by 2e-9
  # plainly but up to 7e-6 after the rescale, where diffusers recovers betas as
  # 1 - ᾱ_t / ᾱ_{t-1} from float32 ratios (cancellation).
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0,
                             atol=1.5e-6)
  np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=1e-6,
                             atol=1.5e-5 if zero_snr else 1e-8)
  assert s.betas.dtype == s.alphas_cumprod.dtype == jnp.float32


@pytest.mark.parametrize("ours,_,start,end", SCHEDULES)
def test_zero_terminal_snr_properties(ours, _, start, end):
  plain = sched.make_schedule(1000, ours, start, end)
  rescaled = sched.make_schedule(1000, ours, start, end, zero_terminal_snr=True)
  ab = np.asarray(rescaled.alphas_cumprod)
  assert ab[-1] == 0.0  # exactly
  assert plain.alphas_cumprod[-1] > 0
  assert np.all(np.diff(ab) < 0) and np.all(np.diff(np.asarray(plain.alphas_cumprod)) < 0)
  assert float(sched.snr(rescaled, 999)) == 0.0
  # The rescale keeps sqrt(ᾱ_0), hence SNR at t = 0.
  np.testing.assert_allclose(float(sched.snr(rescaled, 0)), float(sched.snr(plain, 0)), rtol=1e-5)


def test_rescale_matches_diffusers_in_float64():
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
  ours = sched.rescale_zero_terminal_snr(betas)
  theirs = diffusers.schedulers.scheduling_ddim.rescale_zero_terminal_snr(
      torch.from_numpy(betas)).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)
  assert ours[-1] == 1.0


def test_add_noise_matches_diffusers():
  s = sched.make_schedule(zero_terminal_snr=True)
  ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                rescale_betas_zero_snr=True)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((4, 2, 3, 3, 2)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 17, 500, 999])
  ours = sched.add_noise(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  theirs = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=2e-5)
  ours_v = sched.velocity(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  theirs_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  np.testing.assert_allclose(np.asarray(ours_v), theirs_v.numpy(), atol=2e-5)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conversions_round_trip(zero_snr, seed):
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(rng.standard_normal((6, 2, 4, 4, 3)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = jnp.asarray(np.concatenate([[0, 999], rng.integers(0, 1000, 4)]))
  v_sched = sched.make_schedule(zero_terminal_snr=zero_snr, prediction_type="v_prediction")
  x_t = sched.add_noise(v_sched, x0, noise, t)
  v = sched.training_target(v_sched, x0, noise, t)
  # v-prediction is exact everywhere, including ᾱ = 0 at t = 999 (x0 = -v).
  np.testing.assert_allclose(sched.predict_x0(v_sched, x_t, v, t), x0, atol=3e-5)
  np.testing.assert_allclose(sched.predict_eps(v_sched, x_t, v, t), noise, atol=3e-5)
  if zero_snr:
    np.testing.assert_array_equal(sched.predict_x0(v_sched, x_t, v, t)[1], -v[1])
  # Independent closed form of v.
  a = np.asarray(v_sched.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1, 1)
  np.testing.assert_allclose(v, np.sqrt(a) * noise - np.sqrt(1 - a) * x0, atol=1e-6)

  e_sched = sched.make_schedule(zero_terminal_snr=zero_snr, prediction_type="epsilon")
  np.testing.assert_array_equal(sched.training_target(e_sched, x0, noise, t), noise)
  x0_hat = sched.predict_x0(e_sched, x_t, noise, t)
  if zero_snr:
    assert not np.all(np.isfinite(x0_hat[1]))  # documented: undefined at ᾱ = 0
    x0_hat, x0 = x0_hat[2:], x0[2:]
  # Relative to 1/sqrt(ᾱ), the amplification of rounding in x_t near t = T.
  np.testing.assert_allclose(x0_hat, x0, atol=3e-3)


def test_loss_zero_for_the_true_target_and_closed_form_otherwise():
  s = sched.make_schedule(zero_terminal_snr=True)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal((8, 2, 4, 4, 3)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, 8))
  a = np.asarray(s.alphas_cumprod)[np.asarray(t)].reshape(-1, 1, 1, 1, 1)
  v_np = np.sqrt(a) * np.asarray(noise) - np.sqrt(1 - a) * np.asarray(x0)

  def oracle(x_t, tt):
    return sched.velocity(s, x0, noise, tt)

  loss, _ = sched.diffusion_loss(s, oracle, x0, jax.random.key(0), timesteps=t, noise=noise)
  assert float(loss) < 1e-12

  zero_model = lambda x_t, tt: jnp.zeros_like(x_t)
  loss, aux = sched.diffusion_loss(s, zero_model, x0, jax.random.key(0), timesteps=t, noise=noise)
  per_example = (v_np**2).mean(axis=(1, 2, 3, 4))
  np.testing.assert_allclose(aux["per_example_loss"], per_example, rtol=1e-5)
  np.testing.assert_allclose(float(loss), per_example.mean(), rtol=1e-5)

  # Min-SNR-5 for v (diffusers' train_text_to_image: min(snr, γ) / (snr + 1)).
  snr = a.ravel() / (1 - a.ravel())
  loss, aux = sched.diffusion_loss(s, zero_model, x0, jax.random.key(0), weighting="min_snr",
                                   timesteps=t, noise=noise)
  np.testing.assert_allclose(aux["weights"], np.minimum(snr, 5.0) / (snr + 1), rtol=1e-5)
  np.testing.assert_allclose(float(loss), (np.minimum(snr, 5.0) / (snr + 1) * per_example).mean(),
                             rtol=1e-5)

  # The mask averages each example over its kept frames only.
  mask = np.zeros((8, 2, 1, 1, 1), np.float32)
  mask[:, 1] = 1
  _, aux = sched.diffusion_loss(s, zero_model, x0, jax.random.key(0), mask=jnp.asarray(mask),
                                timesteps=t, noise=noise)
  np.testing.assert_allclose(aux["per_example_loss"], (v_np[:, 1]**2).mean(axis=(1, 2, 3)),
                             rtol=1e-5)


def test_min_snr_for_epsilon_is_finite_at_zero_snr():
  s = sched.make_schedule(zero_terminal_snr=True, prediction_type="epsilon")
  t = jnp.array([0, 500, 900, 999])
  snr = np.asarray(sched.snr(s, t))
  w = sched.loss_weights(s, t, "min_snr", 5.0)
  expected = np.where(snr > 0, np.minimum(snr, 5.0) / np.maximum(snr, 1e-30), 1.0)
  np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_loss_samples_timesteps_uniformly_and_jits():
  s = sched.make_schedule(num_train_timesteps=10)
  x0 = jnp.zeros((4000, 2))
  loss_fn = jax.jit(lambda k: sched.diffusion_loss(s, lambda x, t: x, x0, k))
  _, aux = loss_fn(jax.random.key(3))
  counts = np.bincount(np.asarray(aux["timesteps"]), minlength=10)
  assert counts.shape == (10,)
  # 400 expected per bin; 6 standard deviations is ~120.
  assert np.all(np.abs(counts - 400) < 120), counts
