"""Classifier-free guidance over text and image conditions (EMU Video style).

The video model is ``apply_fn(x_t [B, F, H, W, C], t [B], context [B, L, D],
condition [B, F, H, W, Cc]) -> [B, F, H, W, C]`` (parameters already bound).
"Text" is ``context`` (null: the encoding of the empty prompt, or whatever the
model was trained with as null text); "image" is ``condition`` (null: zeros
unless given).

Two-way guidance (Brooks et al. 2023; EMU Video) evaluates three passes

    uncond = f(null text, null image)
    image  = f(null text, image)
    full   = f(text,      image)

and returns ``uncond + w_img (image - uncond) + w_txt (full - image)``.
Special cases callers express through the arguments:

* Ordinary text CFG with the image always present: ``image_scale = 1`` (then
  ``uncond`` cancels); ``text_guided_model_fn`` does this in two passes.
* A model or sample without image conditioning: pass ``condition`` equal to
  ``condition_null``; ``image`` then equals ``uncond`` and the result is ordinary
  text CFG with scale ``text_scale`` whatever ``image_scale`` is.
* ``image_scale = text_scale = 1`` is the plain conditional model.

Training drops conditions with ``drop_conditions`` so the null passes are
in-distribution.

``rescale`` (φ, Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
Steps are Flawed", eq. 15-16; diffusers' ``guidance_rescale``) is the guidance
fix that goes with a zero-terminal-SNR schedule: the guided output is scaled to
the standard deviation of the fully conditioned pass, per example, and mixed
with the unscaled one as ``φ rescaled + (1 - φ) guided``, which undoes the
over-exposure large weights cause. 0 (the default) leaves the guidance as is.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

# apply_fn(x_t, t, context, condition) -> model output.
ApplyFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def combine(out_uncond: jax.Array, out_image: jax.Array, out_full: jax.Array,
            image_scale, text_scale, rescale: float = 0.0) -> jax.Array:
  """Two-way classifier-free guidance of model outputs (all ``[B, ...]``).

  ``out_uncond + image_scale (out_image - out_uncond) + text_scale (out_full -
  out_image)``; the scales are scalars or arrays broadcastable to the outputs.
  Linear in the outputs, so it applies to epsilon and v outputs alike.
  ``rescale`` is φ of ``rescale_guidance``.
  """
  guided = (out_uncond + image_scale * (out_image - out_uncond)
            + text_scale * (out_full - out_image))
  return rescale_guidance(guided, out_full, rescale)


def rescale_guidance(guided: jax.Array, conditional: jax.Array, rescale: float) -> jax.Array:
  """``rescale * guided * std(conditional) / std(guided) + (1 - rescale) * guided``.

  Standard deviations are per example, over all other axes. A no-op for
  ``rescale = 0``.
  """
  if isinstance(rescale, (int, float)) and rescale == 0:
    return guided
  axes = tuple(range(1, guided.ndim))
  ratio = (jnp.std(conditional, axis=axes, keepdims=True)
           / jnp.std(guided, axis=axes, keepdims=True))
  return rescale * (guided * ratio) + (1.0 - rescale) * guided


def _null_like(null: Optional[jax.Array], value: jax.Array) -> jax.Array:
  if null is None:
    return jnp.zeros_like(value)
  return jnp.broadcast_to(jnp.asarray(null, value.dtype), value.shape)


def guided_model_fn(apply_fn: ApplyFn,
                    *,
                    context: jax.Array,
                    context_null: jax.Array,
                    condition: jax.Array,
                    condition_null: Optional[jax.Array] = None,
                    image_scale: float,
                    text_scale: float,
                    rescale: float = 0.0) -> ModelFn:
  """A sampler's ``model_fn`` doing two-way CFG in one batched model call.

  Args:
    apply_fn: ``(x_t [N, ...], t [N], context [N, L, D], condition [N, ...])
      -> [N, ...]``; it is called once with ``N = 3B``.
    context: ``[B, L, D]`` text encodings.
    context_null: null text encodings broadcastable to ``[B, L, D]`` (e.g.
      ``[1, L, D]``).
    condition: ``[B, F, H, W, Cc]`` image conditioning.
    condition_null: null conditioning broadcastable to ``condition``; None
      means zeros.
    image_scale, text_scale: guidance weights (see ``combine``).
    rescale: φ of ``rescale_guidance`` (0: none).

  Returns:
    ``model_fn(x_t [B, ...], t [B]) -> [B, ...]`` guided output. The passes are
    stacked along the batch as ``[uncond; image; full]``.
  """
  context_null = _null_like(context_null, context)
  condition_null = _null_like(condition_null, condition)
  contexts = jnp.concatenate([context_null, context_null, context], axis=0)
  conditions = jnp.concatenate([condition_null, condition, condition], axis=0)

  def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
    t = jnp.broadcast_to(t, x_t.shape[:1])
    out = apply_fn(jnp.concatenate([x_t] * 3, axis=0), jnp.concatenate([t] * 3, axis=0),
                   contexts, conditions)
    out_uncond, out_image, out_full = jnp.split(out, 3, axis=0)
    return combine(out_uncond, out_image, out_full, image_scale, text_scale, rescale)

  return model_fn


def text_guided_model_fn(apply_fn: ApplyFn,
                         *,
                         context: jax.Array,
                         context_null: jax.Array,
                         condition: jax.Array,
                         text_scale: float,
                         rescale: float = 0.0) -> ModelFn:
  """Ordinary text CFG in one batched call of two passes (image kept in both).

  ``f(null text, condition) + text_scale (f(text, condition) - f(null text,
  condition))``, i.e. ``combine`` with ``image_scale = 1``. Arguments as
  ``guided_model_fn``; for a sample without an image pass the null condition.
  """
  context_null = _null_like(context_null, context)
  contexts = jnp.concatenate([context_null, context], axis=0)
  conditions = jnp.concatenate([condition, condition], axis=0)

  def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
    t = jnp.broadcast_to(t, x_t.shape[:1])
    out = apply_fn(jnp.concatenate([x_t] * 2, axis=0), jnp.concatenate([t] * 2, axis=0),
                   contexts, conditions)
    out_image, out_full = jnp.split(out, 2, axis=0)
    return rescale_guidance(out_image + text_scale * (out_full - out_image), out_full, rescale)

  return model_fn


def drop_conditions(key: jax.Array,
                    context: jax.Array,
                    null_context: jax.Array,
                    condition: jax.Array,
                    *,
                    p_text: float,
                    p_image: float,
                    p_both: float,
                    null_condition: Optional[jax.Array] = None):
  """Guidance dropout for training: per example, drop text, image, both or none.

  The three events are exclusive: with probability ``p_text`` only the text is
  replaced by the null text, with ``p_image`` only the image, with ``p_both``
  both (so the text is dropped with probability ``p_text + p_both``).

  Args:
    key: PRNG key.
    context: ``[B, L, D]`` text encodings.
    null_context: null text broadcastable to ``[B, L, D]``.
    condition: ``[B, ...]`` image conditioning.
    p_text, p_image, p_both: event probabilities (sum at most 1).
    null_condition: broadcastable to ``condition``; None means zeros.

  Returns:
    ``(context, condition)`` with dropped examples replaced exactly by the null
    values.
  """
  if min(p_text, p_image, p_both) < 0 or p_text + p_image + p_both > 1:
    raise ValueError("drop probabilities must be non-negative and sum to at most 1")
  u = jax.random.uniform(key, context.shape[:1])
  text_only = u < p_text
  image_only = (u >= p_text) & (u < p_text + p_image)
  both = (u >= p_text + p_image) & (u < p_text + p_image + p_both)
  drop_text = text_only | both
  drop_image = image_only | both

  def select(drop, null, value):
    drop = drop.reshape(drop.shape + (1,) * (value.ndim - 1))
    return jnp.where(drop, _null_like(null, value), value)

  return select(drop_text, null_context, context), select(drop_image, null_condition, condition)
