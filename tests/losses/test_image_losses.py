"""Pixel, opacity, total-variation and LPIPS losses on hand-checked cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax import losses


def test_mse_and_l1_against_numpy():
  rng = np.random.default_rng(0)
  pred = rng.uniform(size=(2, 3, 8, 8, 3)).astype(np.float32)
  target = rng.uniform(size=(2, 3, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.mse_loss(pred, target),
                             np.mean((pred.astype(np.float64) - target) ** 2), rtol=1e-6)
  np.testing.assert_allclose(losses.l1_loss(pred, target),
                             np.mean(np.abs(pred.astype(np.float64) - target)), rtol=1e-6)
  assert float(losses.mse_loss(jnp.array([1.0, 3.0]), jnp.array([0.0, 0.0]))) == 5.0
  assert float(losses.l1_loss(jnp.array([1.0, -3.0]), jnp.array([0.0, 0.0]))) == 2.0


def test_shape_mismatch_is_refused():
  with pytest.raises(ValueError, match="shapes differ"):
    losses.opacity_loss(jnp.zeros((2, 4, 4)), jnp.zeros((2, 4, 4, 1)))
  with pytest.raises(ValueError, match="kind must be one of"):
    losses.opacity_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), kind="l2")


def test_opacity_loss_by_hand():
  opacity = jnp.array([[0.5, 1.0], [0.0, 0.25]])
  mask = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  # MSE: (0.25 + 0 + 0 + 0.0625) / 4.
  np.testing.assert_allclose(losses.opacity_loss(opacity, mask), 0.078125, rtol=1e-6)
  # BCE: (-log 0.5 - log(1 - 1e-6) - log(1 - 1e-6) - log 0.75) / 4; the clip
  # keeps the exact 1.0 and 0.0 entries finite.
  expected = (np.log(2) - 2 * np.log1p(-1e-6) - np.log(0.75)) / 4
  np.testing.assert_allclose(losses.opacity_loss(opacity, mask, kind="bce"), expected, rtol=1e-5)
  wrong = losses.opacity_loss(jnp.array([0.0]), jnp.array([1.0]), kind="bce")
  np.testing.assert_allclose(wrong, -np.log(1e-6), rtol=1e-4)
  grads = jax.grad(lambda o: losses.opacity_loss(o, mask, kind="bce"))(opacity)
  assert np.all(np.isfinite(grads))
  np.testing.assert_allclose(grads[0, 0], -1 / 0.5 / 4, rtol=1e-5)


def _openlrm_tv(planes_nmchw):
  """OpenLRM's TVLoss on [N, M, C, H, W], in float64 numpy."""
  n, m, c, h, w = planes_nmchw.shape
  x = planes_nmchw.reshape(n * m, c, h, w).astype(np.float64)
  diff_i = x[..., 1:, :] - x[..., :-1, :]
  diff_j = x[..., :, 1:] - x[..., :, :-1]
  tv = ((diff_i ** 2).sum(axis=(1, 2, 3)) / diff_i[0].size
        + (diff_j ** 2).sum(axis=(1, 2, 3)) / diff_j[0].size)
  return tv.reshape(n, m).mean(axis=1).mean()


def test_total_variation_loss():
  # One 2x3 single-channel plane, the other two constant:
  # vertical diffs (3 of them) 3, 3, 3 -> mean 9; horizontal (4) 1, 1, 1, 1 -> 1;
  # per plane [10, 0, 0] -> mean 10/3.
  planes = np.zeros((1, 3, 2, 3, 1), np.float32)
  planes[0, 0, :, :, 0] = [[0, 1, 2], [3, 4, 5]]
  planes[0, 1] = 7.0
  np.testing.assert_allclose(losses.total_variation_loss(planes), 10 / 3, rtol=1e-6)
  rng = np.random.default_rng(1)
  planes = rng.normal(size=(2, 3, 5, 7, 4)).astype(np.float32)
  np.testing.assert_allclose(losses.total_variation_loss(planes),
                             _openlrm_tv(planes.transpose(0, 1, 4, 2, 3)), rtol=1e-6)
  with pytest.raises(ValueError, match=r"\[N, 3, H, W, C\]"):
    losses.total_variation_loss(planes[0])


def test_lpips_loss_gradients():
  images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  params = jax.jit(losses.LPIPS().init)(jax.random.key(0), images, images)["params"]
  rng = np.random.default_rng(2)
  pred = rng.uniform(size=(2, 2, 16, 16, 3)).astype(np.float32)
  target = rng.uniform(size=(2, 2, 16, 16, 3)).astype(np.float32)
  loss_fn = jax.jit(jax.value_and_grad(losses.lpips_loss, argnums=(1, 2)))
  value, (grad_pred, grad_target) = loss_fn(params, pred, target)
  distances = jax.jit(losses.lpips_distance, static_argnames="normalize")(
      params, pred, target, normalize=True)
  np.testing.assert_allclose(value, jnp.mean(distances), rtol=1e-6)
  assert np.all(np.isfinite(grad_pred)) and np.abs(grad_pred).max() > 0
  np.testing.assert_array_equal(grad_target, 0.0)
