"""PSNR by hand, SSIM against scikit-image, LPIPS through the metric API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from vf3d_jax import evaluation
from vf3d_jax.losses import lpips as lpips_lib


def test_psnr_by_hand():
  target = np.zeros((2, 4, 4, 3), np.float32)
  pred = target.copy()
  pred[0] += 0.1  # mse 0.01 -> 20 dB
  pred[1, 0, 0, 0] = 0.5  # mse 0.25 / 48
  expected = [20.0, 10 * np.log10(48 / 0.25)]
  np.testing.assert_allclose(evaluation.psnr(pred, target), expected, rtol=1e-5)
  np.testing.assert_allclose(evaluation.psnr(pred * 255, target * 255, data_range=255.0),
                             expected, rtol=1e-5)
  assert np.isinf(evaluation.psnr(target, target)).all()


def _smooth_images(rng, shape):
  """Low-frequency images, where SSIM's variances are small and sensitive."""
  coarse = rng.uniform(size=(shape[0], shape[1] // 8 + 1, shape[2] // 8 + 1, shape[3]))
  image = jax.image.resize(coarse, (shape[0],) + shape[1:], "linear")
  return np.asarray(image, np.float32)


def test_ssim_matches_skimage():
  rng = np.random.default_rng(0)
  noisy = rng.uniform(size=(2, 24, 40, 3)).astype(np.float32)
  smooth = _smooth_images(rng, (2, 24, 40, 3))
  pred = np.concatenate([noisy[:1], smooth[:1], smooth[1:]])
  smooth_noisy = np.clip(smooth[:1] + 0.05 * rng.normal(size=(1, 24, 40, 3)), 0, 1)
  target = np.concatenate([noisy[1:], smooth_noisy, smooth[1:] * 0.9 + 0.05]).astype(np.float32)
  got = evaluation.ssim(pred.reshape(3, 1, 24, 40, 3), target.reshape(3, 1, 24, 40, 3))
  assert got.shape == (3, 1)
  expected = [structural_similarity(p.astype(np.float64), t.astype(np.float64),
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1, channel_axis=-1)
              for p, t in zip(pred, target)]
  # float32 here against float64 there; E[x^2] - E[x]^2 loses ~1e-7 absolute,
  # which C2 = 9e-4 turns into at most ~1e-4 per pixel, far less on average.
  np.testing.assert_allclose(got[:, 0], expected, atol=1e-5)
  np.testing.assert_allclose(evaluation.ssim(target, target), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="smaller than the 11x11 window"):
    evaluation.ssim(pred[:, :10], target[:, :10])


def test_lpips_metric_and_image_metrics():
  images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  params = jax.jit(lpips_lib.LPIPS().init)(jax.random.key(0), images, images)["params"]
  rng = np.random.default_rng(1)
  pred = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  target = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  metrics = evaluation.image_metrics(pred, target, lpips_params={"params": params})
  assert set(metrics) == {"psnr", "ssim", "lpips"}
  assert all(v.shape == (2,) for v in metrics.values())
  np.testing.assert_allclose(
      metrics["lpips"], jax.jit(lpips_lib.lpips_distance)(params, 2 * pred - 1, 2 * target - 1),
      rtol=1e-5)
  assert "lpips" not in evaluation.image_metrics(pred, target)
