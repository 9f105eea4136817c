"""Training losses on rendered views and on triplanes.

Images are channels-last ``[..., H, W, 3]`` in ``[0, 1]``; every loss returns
a float32 scalar, the mean over all its elements (for equally sized views
this is OpenLRM's per-view mean followed by the batch mean).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vf3d_jax.losses import lpips as lpips_lib

OPACITY_LOSS_KINDS = ("mse", "bce")
# Opacity is clipped into [eps, 1 - eps] before the logs of the BCE.
BCE_EPS = 1e-6


def _check_same_shape(name: str, a: jax.Array, b: jax.Array) -> None:
  # Broadcasting [B, H, W] against [B, H, W, 1] would silently give a 4-D grid.
  if a.shape != b.shape:
    raise ValueError(f"{name}: shapes differ, {a.shape} vs {b.shape}")


def mse_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error.

  Args:
    pred: ``[...]``.
    target: same shape.

  Returns:
    ``[]`` float32.
  """
  _check_same_shape("mse_loss", pred, target)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean absolute error; ``pred, target: [...]`` -> ``[]`` float32."""
  _check_same_shape("l1_loss", pred, target)
  return jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def opacity_loss(opacity: jax.Array, mask: jax.Array, kind: str = "mse",
                 eps: float = BCE_EPS) -> jax.Array:
  """Rendered opacity against the foreground mask.

  Args:
    opacity: ``[...]`` accumulated ray weights, nominally in ``[0, 1]``.
    mask: same shape, foreground mask in ``[0, 1]`` (soft alpha allowed).
    kind: ``"mse"`` (squared error) or ``"bce"`` (binary cross-entropy on the
      opacity clipped into ``[eps, 1 - eps]``).
    eps: clipping margin of the BCE.

  Returns:
    ``[]`` float32.
  """
  _check_same_shape("opacity_loss", opacity, mask)
  opacity = opacity.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  if kind == "mse":
    return jnp.mean(jnp.square(opacity - mask))
  if kind == "bce":
    opacity = jnp.clip(opacity, eps, 1.0 - eps)
    return -jnp.mean(mask * jnp.log(opacity) + (1.0 - mask) * jnp.log1p(-opacity))
  raise ValueError(f"opacity_loss: kind must be one of {OPACITY_LOSS_KINDS}, got {kind!r}")


def total_variation_loss(planes: jax.Array) -> jax.Array:
  """Squared total variation of triplanes, as OpenLRM's ``TVLoss``.

  Per plane, the mean squared difference of vertical neighbours plus that of
  horizontal neighbours; then the mean over planes and batch.

  Args:
    planes: ``[N, 3, H, W, C]``.

  Returns:
    ``[]`` float32.
  """
  if planes.ndim != 5:
    raise ValueError(f"total_variation_loss: planes must be [N, 3, H, W, C], got {planes.shape}")
  planes = planes.astype(jnp.float32)
  diff_h = planes[:, :, 1:] - planes[:, :, :-1]
  diff_w = planes[:, :, :, 1:] - planes[:, :, :, :-1]
  # Every plane has the same element count, so global means equal the
  # mean over planes of per-plane means.
  return jnp.mean(jnp.square(diff_h)) + jnp.mean(jnp.square(diff_w))


def lpips_loss(lpips_params: Mapping[str, Any], pred: jax.Array,
               target: jax.Array, *, normalize: bool = True,
               dtype: Any = jnp.float32) -> jax.Array:
  """Mean LPIPS (VGG, v0.1) between predicted and target views.

  Args:
    lpips_params: from :func:`vf3d_jax.losses.lpips.load_lpips_params`.
    pred: ``[..., H, W, 3]``, in ``[0, 1]`` (``[-1, 1]`` if not ``normalize``);
      H and W at least 16.
    target: same shape; no gradient flows into it.
    normalize: the images are in ``[0, 1]`` (OpenLRM calls lpips this way).
    dtype: compute dtype of the VGG trunk, e.g. ``jnp.bfloat16``.

  Returns:
    ``[]`` float32.
  """
  _check_same_shape("lpips_loss", pred, target)
  distances = lpips_lib.lpips_distance(
      lpips_params, pred, jax.lax.stop_gradient(target),
      normalize=normalize, dtype=dtype)
  return jnp.mean(distances)
