"""PyTorch-compatible bicubic resizing.

``jax.image.resize`` uses the Keys cubic with ``A = -0.5`` and antialiasing,
so it cannot reproduce tensors that PyTorch's ``F.interpolate(mode="bicubic")``
made. The released model depends on that exact resize twice: the DINOv2
position table (37x37 -> 36x36, ``align_corners=False``, with an explicit scale
in legacy mode) and the input image (to 512, ``align_corners=True``).

A separable resize is a matrix product per axis, so each axis is described by
an ``[out, in]`` weight matrix built once in NumPy (float64) from PyTorch's
formulas: cubic convolution with ``A = -0.75``, taps at ``floor(src) - 1 ..
floor(src) + 2`` with indices clamped to the border.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # PyTorch's bicubic coefficient.


def _cubic_weights(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
  """The four tap weights for fractional offsets ``t`` in [0, 1): ``[..., 4]``."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, align_corners: bool,
                   scale: float | None = None) -> np.ndarray:
  """The ``[out_size, in_size]`` matrix of PyTorch's 1-D bicubic resampling.

  Args:
    in_size: input length.
    out_size: output length.
    align_corners: PyTorch's ``align_corners``.
    scale: with ``align_corners=False``, the ``scale_factor`` PyTorch was
      given (source step ``1 / scale``); ``None`` uses ``in_size / out_size``
      as PyTorch does when given a size.

  Returns:
    float64 weights; row ``o`` holds the contribution of each input sample.
  """
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    step = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = dst * step
  else:
    step = 1.0 / scale if scale is not None else in_size / out_size
    src = (dst + 0.5) * step - 0.5  # not clamped at 0 for cubic, as in PyTorch
  base = np.floor(src)
  weights = _cubic_weights(src - base)
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    index = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
  return matrix


def resize_bicubic(x: jax.Array, out_hw: tuple[int, int], align_corners: bool,
                   scale: tuple[float, float] | None = None,
                   axes: tuple[int, int] = (-3, -2)) -> jax.Array:
  """Bicubic resize of two axes, numerically PyTorch's ``F.interpolate``.

  Args:
    x: array with height and width at ``axes`` (default ``[..., H, W, C]``).
    out_hw: output ``(height, width)``.
    align_corners: PyTorch's ``align_corners``.
    scale: optional ``(scale_h, scale_w)`` as passed to PyTorch's
      ``scale_factor`` (only with ``align_corners=False``).
    axes: the height and width axes.

  Returns:
    The resized array, float32 (no clamping; callers clamp where PyTorch code does).
  """
  h_axis, w_axis = (a % x.ndim for a in axes)
  scale_h, scale_w = scale if scale is not None else (None, None)
  mh = bicubic_matrix(x.shape[h_axis], out_hw[0], align_corners, scale_h)
  mw = bicubic_matrix(x.shape[w_axis], out_hw[1], align_corners, scale_w)
  x = x.astype(jnp.float32)
  x = jnp.moveaxis(jnp.tensordot(jnp.asarray(mh, jnp.float32), x, axes=((1,), (h_axis,)),
                                 precision="highest"), 0, h_axis)
  x = jnp.moveaxis(jnp.tensordot(jnp.asarray(mw, jnp.float32), x, axes=((1,), (w_axis,)),
                                 precision="highest"), 0, w_axis)
  return x


def scaled_size(in_size: int, scale: float) -> int:
  """Output length PyTorch gives for ``scale_factor=scale``: ``floor(in * scale)``."""
  return int(math.floor(in_size * scale))
