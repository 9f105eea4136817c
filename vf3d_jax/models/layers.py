"""Layers shared by the encoder and the triplane transformer."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's nn.Linear kernel initialisation (kaiming_uniform with a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# Exact (erf) GELU, as nn.GELU() in PyTorch.
gelu = functools.partial(nn.gelu, approximate=False)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with two-pass variance (PyTorch's numerics), statistics in float32."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
              implementation: str | None = None) -> jax.Array:
  """Scaled dot-product attention over heads.

  Args:
    q: ``[B, T, D]`` queries.
    k: ``[B, S, D]`` keys.
    v: ``[B, S, D]`` values.
    heads: number of heads; ``D`` must divide evenly.
    implementation: ``None`` (XLA), ``"xla"`` or ``"cudnn"`` (GPU flash
      attention; needs float16/bfloat16 inputs).

  Returns:
    ``[B, T, D]``.
  """
  split = lambda x: x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))
  out = jax.nn.dot_product_attention(split(q), split(k), split(v),
                                     implementation=implementation)
  return out.reshape(q.shape)
