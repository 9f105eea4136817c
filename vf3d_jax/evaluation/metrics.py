"""Image quality metrics: PSNR, SSIM and LPIPS, one value per image.

Images are channels-last ``[..., H, W, C]`` with any leading batch shape;
metrics come back as ``[...]`` float32. They are pure functions, jitted here
with their options static, and compose with ``jax.vmap``.

SSIM is skimage's ``structural_similarity(a, b, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)``:
Gaussian window (radius ``int(3.5 * sigma + 0.5)`` = 5, i.e. 11 taps),
population covariances, ``K1 = 0.01, K2 = 0.03``, the SSIM map averaged over
the pixels whose window lies inside the image and then over channels.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax.losses import lpips as lpips_lib


def _check_images(name: str, pred: jax.Array, target: jax.Array) -> None:
  if pred.shape != target.shape or pred.ndim < 3:
    raise ValueError(f"{name}: expected two [..., H, W, C] arrays of one shape, "
                     f"got {pred.shape} and {target.shape}")


def _float(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@functools.partial(jax.jit, static_argnames=("data_range",))
def psnr(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio per image, in dB.

  Args:
    pred: ``[..., H, W, C]``.
    target: same shape.
    data_range: the peak value (1 for images in ``[0, 1]``).

  Returns:
    ``[...]``: ``10 log10(data_range^2 / mse)``; ``inf`` for identical images.
  """
  _check_images("psnr", pred, target)
  mse = jnp.mean(jnp.square(_float(pred) - _float(target)), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
  """scipy.ndimage's normalised 1-D Gaussian: ``[2 r + 1]``, ``r = int(truncate sigma + 0.5)``."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  window = np.exp(-0.5 * (x / sigma) ** 2)
  return window / window.sum()


def _filter_valid(x: jax.Array, window: np.ndarray) -> jax.Array:
  """Separable correlation over the H and W axes of ``[..., H, W, C]``, 'valid'."""
  taps = len(window)
  out_h = x.shape[-3] - taps + 1
  x = sum(float(w) * x[..., k:k + out_h, :, :] for k, w in enumerate(window))
  out_w = x.shape[-2] - taps + 1
  return sum(float(w) * x[..., :, k:k + out_w, :] for k, w in enumerate(window))


@functools.partial(jax.jit, static_argnames=("data_range", "sigma", "k1", "k2"))
def ssim(pred: jax.Array, target: jax.Array, data_range: float = 1.0,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Structural similarity per image (Gaussian-weighted, as skimage).

  Args:
    pred: ``[..., H, W, C]``, H and W at least the window size (11).
    target: same shape.
    data_range: the value range of the images.
    sigma: standard deviation of the Gaussian window.
    k1: luminance constant, ``C1 = (k1 data_range)^2``.
    k2: contrast constant, ``C2 = (k2 data_range)^2``.

  Returns:
    ``[...]`` mean SSIM over the interior pixels and channels.
  """
  _check_images("ssim", pred, target)
  window = gaussian_window(sigma)
  if min(pred.shape[-3:-1]) < len(window):
    raise ValueError(f"ssim: images {pred.shape[-3:-1]} are smaller than the "
                     f"{len(window)}x{len(window)} window")
  x = _float(pred)
  y = _float(target)
  # A filter over the whole image cropped by the window radius, as skimage
  # does, equals the 'valid' filter: the border mode never matters.
  mu_x = _filter_valid(x, window)
  mu_y = _filter_valid(y, window)
  var_x = _filter_valid(x * x, window) - mu_x * mu_x
  var_y = _filter_valid(y * y, window) - mu_y * mu_y
  cov_xy = _filter_valid(x * y, window) - mu_x * mu_y
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  ssim_map = ((2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
              / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))
  return jnp.mean(ssim_map, axis=(-3, -2, -1))


@functools.partial(jax.jit, static_argnames=("normalize", "dtype"))
def lpips(lpips_params: Mapping[str, Any], pred: jax.Array, target: jax.Array,
          normalize: bool = True, dtype: Any = jnp.float32) -> jax.Array:
  """LPIPS (VGG, v0.1) per image; lower is more similar.

  Args:
    lpips_params: from :func:`vf3d_jax.losses.lpips.load_lpips_params`.
    pred: ``[..., H, W, 3]`` in ``[0, 1]`` (``[-1, 1]`` if not ``normalize``).
    target: same shape.
    normalize: the images are in ``[0, 1]``.
    dtype: compute dtype of the VGG trunk.

  Returns:
    ``[...]`` float32.
  """
  _check_images("lpips", pred, target)
  return lpips_lib.lpips_distance(lpips_params, pred, target,
                                  normalize=normalize, dtype=dtype)


def image_metrics(pred: jax.Array, target: jax.Array,
                  lpips_params: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
  """PSNR, SSIM and (given its weights) LPIPS of images in ``[0, 1]``.

  Args:
    pred: ``[..., H, W, 3]`` in ``[0, 1]``.
    target: same shape.
    lpips_params: LPIPS weights; without them the ``"lpips"`` entry is absent.

  Returns:
    ``{"psnr": [...], "ssim": [...], "lpips": [...]}``.
  """
  metrics = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
  if lpips_params is not None:
    metrics["lpips"] = lpips(lpips_params, pred, target)
  return metrics
