"""Two-way classifier-free guidance and guidance dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.diffusion import guidance

B, F, H, W, C, CC, L, D = 2, 3, 4, 4, 2, 3, 5, 6


def _toy_apply(x, t, context, condition):
  """Nonlinear in every input, per example (like a real model)."""
  text = jnp.tanh(context.mean(axis=(1, 2)))[:, None, None, None, None]
  image = condition.mean(axis=-1, keepdims=True)
  tt = (t.astype(jnp.float32) / 1000.0)[:, None, None, None, None]
  return jnp.sin(x + text) * (1.0 + image) + tt * image**2


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return dict(x=f32(B, F, H, W, C), t=jnp.array([10, 900]), context=f32(B, L, D),
              context_null=f32(1, L, D), condition=f32(B, F, H, W, CC))


def test_combine_special_cases():
  rng = np.random.default_rng(0)
  u, i, f = (jnp.asarray(rng.standard_normal((3, 4))) for _ in range(3))
  np.testing.assert_allclose(guidance.combine(u, i, f, 1.0, 1.0), f, atol=1e-6)
  np.testing.assert_allclose(guidance.combine(u, i, f, 1.0, 0.0), i, atol=1e-6)
  np.testing.assert_allclose(guidance.combine(u, i, f, 0.0, 0.0), u, atol=1e-6)
  np.testing.assert_allclose(guidance.combine(u, i, f, 2.5, 7.0),
                             u + 2.5 * (i - u) + 7.0 * (f - i), atol=1e-5)


def test_guidance_rescale_matches_diffusers():
  torch = pytest.importorskip("torch")
  pipeline = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
  rng = np.random.default_rng(1)
  u, i, f = (rng.standard_normal((B, F, H, W, C)).astype(np.float32) for _ in range(3))
  f = 0.5 * f  # the conditional pass at a smaller scale than the guided output
  guided = np.asarray(guidance.combine(u, i, f, 2.0, 5.0))
  for phi in (0.0, 0.7, 1.0):
    ours = guidance.combine(u, i, f, 2.0, 5.0, rescale=phi)
    theirs = pipeline.rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(f),
                                        guidance_rescale=phi).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  full = np.asarray(guidance.combine(u, i, f, 2.0, 5.0, rescale=1.0))
  np.testing.assert_allclose(full.reshape(B, -1).std(axis=1), f.reshape(B, -1).std(axis=1),
                             rtol=1e-5)
  assert np.abs(full - guided).max() > 0.1
  # The two-pass text guidance rescales the same way.
  inp = _inputs()
  two = guidance.text_guided_model_fn(_toy_apply, context=inp["context"],
                                      context_null=inp["context_null"],
                                      condition=inp["condition"], text_scale=4.0, rescale=0.7)
  three = guidance.guided_model_fn(_toy_apply, context=inp["context"],
                                   context_null=inp["context_null"], condition=inp["condition"],
                                   image_scale=1.0, text_scale=4.0, rescale=0.7)
  np.testing.assert_allclose(two(inp["x"], inp["t"]), three(inp["x"], inp["t"]), rtol=1e-5,
                             atol=1e-5)


def test_batched_guidance_equals_three_separate_calls():
  inp = _inputs()
  calls = []

  def counting_apply(*args):
    calls.append(args[0].shape[0])
    return _toy_apply(*args)

  model_fn = guidance.guided_model_fn(
      counting_apply, context=inp["context"], context_null=inp["context_null"],
      condition=inp["condition"], image_scale=1.8, text_scale=6.5)
  ours = jax.jit(model_fn)(inp["x"], inp["t"])
  assert calls == [3 * B]  # one batched call

  null_ctx = jnp.broadcast_to(inp["context_null"], inp["context"].shape)
  null_cond = jnp.zeros_like(inp["condition"])
  uncond = _toy_apply(inp["x"], inp["t"], null_ctx, null_cond)
  image = _toy_apply(inp["x"], inp["t"], null_ctx, inp["condition"])
  full = _toy_apply(inp["x"], inp["t"], inp["context"], inp["condition"])
  expected = uncond + 1.8 * (image - uncond) + 6.5 * (full - image)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(expected - full)).max() > 0.1  # guidance does something


def test_text_guidance_is_two_way_guidance_with_unit_image_scale():
  inp = _inputs(1)
  kwargs = dict(context=inp["context"], context_null=inp["context_null"],
                condition=inp["condition"])
  two = guidance.text_guided_model_fn(_toy_apply, text_scale=5.0, **kwargs)(inp["x"], inp["t"])
  three = guidance.guided_model_fn(_toy_apply, image_scale=1.0, text_scale=5.0, **kwargs)(
      inp["x"], inp["t"])
  np.testing.assert_allclose(two, three, rtol=1e-5, atol=1e-5)


def test_without_an_image_the_image_scale_drops_out():
  inp = _inputs(2)
  null_cond = jnp.zeros_like(inp["condition"])
  outs = [guidance.guided_model_fn(
      _toy_apply, context=inp["context"], context_null=inp["context_null"], condition=null_cond,
      image_scale=w, text_scale=4.0)(inp["x"], inp["t"]) for w in (0.0, 3.0)]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_drop_conditions_rates_and_values():
  n = 20000
  rng = np.random.default_rng(0)
  context = jnp.asarray(rng.standard_normal((n, 2, 3)), jnp.float32)
  null_context = jnp.asarray(rng.standard_normal((1, 2, 3)), jnp.float32)
  condition = jnp.asarray(rng.standard_normal((n, 2, 2, 2, 1)), jnp.float32)
  null_condition = jnp.full((1, 1, 1, 1, 1), 7.0)
  p_text, p_image, p_both = 0.1, 0.15, 0.05
  new_ctx, new_cond = jax.jit(lambda k: guidance.drop_conditions(
      k, context, null_context, condition, p_text=p_text, p_image=p_image, p_both=p_both,
      null_condition=null_condition))(jax.random.key(0))
  new_ctx, new_cond = np.asarray(new_ctx), np.asarray(new_cond)

  text_null = np.all(new_ctx == np.asarray(null_context), axis=(1, 2))
  text_kept = np.all(new_ctx == np.asarray(context), axis=(1, 2))
  image_null = np.all(new_cond == 7.0, axis=(1, 2, 3, 4))
  image_kept = np.all(new_cond == np.asarray(condition), axis=(1, 2, 3, 4))
  # Every example is exactly the original or exactly the null value.
  assert np.all(text_null ^ text_kept) and np.all(image_null ^ image_kept)
  for observed, p in [(text_null & ~image_null, p_text), (image_null & ~text_null, p_image),
                      (text_null & image_null, p_both), (~text_null & ~image_null,
                                                         1 - p_text - p_image - p_both)]:
    bound = 5 * np.sqrt(p * (1 - p) / n)
    assert abs(observed.mean() - p) < bound, (observed.mean(), p)


def test_drop_conditions_defaults_to_zero_image_and_rejects_bad_rates():
  context = jnp.ones((64, 2, 3))
  condition = jnp.ones((64, 1, 2, 2, 3))
  _, new_cond = guidance.drop_conditions(jax.random.key(1), context, jnp.zeros((2, 3)), condition,
                                         p_text=0.0, p_image=1.0, p_both=0.0)
  np.testing.assert_array_equal(new_cond, 0.0)
  with pytest.raises(ValueError):
    guidance.drop_conditions(jax.random.key(1), context, jnp.zeros((2, 3)), condition,
                             p_text=0.6, p_image=0.6, p_both=0.0)
