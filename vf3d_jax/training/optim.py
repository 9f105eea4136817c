"""Optimisers as config data: AdamW with warmup + cosine, clipping, freezing by regex.

Parameter groups are chosen by regular expressions over ``/``-joined parameter
paths (``encoder/layer_3/fc1/kernel``), big_vision style:

* ``frozen``: matching parameters get no updates (and no optimizer state);
* ``trainable`` (optional): when set, only matching parameters train and all
  others are frozen (e.g. the temporal adapters of the video model);
* weight decay applies only to matrices and tables (ndim >= 2), never to biases,
  LayerNorm scales or LayerScale vectors.

``ema_decay`` > 0 adds an exponential moving average of the trained parameters
(the weights diffusion models are usually sampled with). It lives in the
optimizer state, Praxis style, so it is sharded, checkpointed and restored with
it; ``ema_params(opt_state)`` reads it.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import optax


def path_mask(params, predicate):
  """A tree of bools: ``predicate(path, leaf)`` for every leaf."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {k: bool(predicate("/".join(k), v)) for k, v in flat.items()})


def is_trained(config, path: str) -> bool:
  """Whether the parameter at ``path`` trains under ``config.frozen`` / ``config.trainable``."""
  trainable = config.get("trainable", "")
  if trainable and not re.search(trainable, path):
    return False
  return not (config.frozen and re.search(config.frozen, path))


def learning_rate_schedule(config, decay_steps: int | None = None) -> optax.Schedule:
  """Linear warmup to ``lr`` then cosine decay to ``lr * final_lr_fraction`` at
  ``decay_steps`` (default ``steps``), constant after it."""
  decay_steps = int(decay_steps or config.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=max(config.warmup_steps, 1),
      decay_steps=max(decay_steps, config.warmup_steps + 1),
      end_value=config.lr * config.final_lr_fraction)


class EmaState(NamedTuple):
  count: jax.Array
  ema_params: Any


def parameter_ema(decay: float) -> optax.GradientTransformation:
  """Keeps an exponential moving average of the parameters after each update.

  The updates pass through unchanged, so this goes last in a chain. Early on
  the decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
  average is not dominated by the initial parameters.
  """
  if not 0.0 < decay < 1.0:
    raise ValueError(f"ema_decay must be in (0, 1), got {decay}")

  def init(params):
    return EmaState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.array, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("parameter_ema needs the parameters: optimizer.update(grads, state, params)")
    n = state.count.astype(jnp.float32)
    rate = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: (rate * e + (1.0 - rate) * p).astype(e.dtype),
                       state.ema_params, new)
    return updates, EmaState(state.count + 1, ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state) -> Any | None:
  """The moving average kept by ``parameter_ema`` in ``opt_state``, or None."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
           if isinstance(s, EmaState)]
  return found[0].ema_params if found else None


def make_optimizer(config, params, decay_steps: int | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW over the trainable parameters of ``params`` (a tree or its shapes).

  Args:
    config: ``lr, warmup_steps, steps, final_lr_fraction, b1, b2, weight_decay,
      grad_clip, frozen`` (a regex; "" freezes nothing) and optionally
      ``trainable`` (a regex; "" or absent trains everything not frozen) and
      ``ema_decay`` (0 or absent: no moving average).
    params: the parameter tree (arrays or ShapeDtypeStructs).
    decay_steps: where the learning rate's decay ends (default ``steps``; a
      resumed run keeps its checkpoint's, see ``loop.resolve_resume``).
  """
  schedule = learning_rate_schedule(config, decay_steps)
  decay = path_mask(params, lambda path, leaf: len(leaf.shape) >= 2)
  adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=1e-8,
                      weight_decay=config.weight_decay, mask=decay)
  chain = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
  optimizer = optax.chain(*chain, adamw)
  trainable = config.get("trainable", "")
  if config.frozen or trainable:
    labels = path_mask(params, lambda path, leaf: not is_trained(config, path))
    labels = jax.tree.map(lambda f: "frozen" if f else "trained", labels)
    if "trained" not in jax.tree.leaves(labels):
      raise ValueError(f"frozen={config.frozen!r}, trainable={trainable!r} freeze every "
                       "parameter")
    optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()},
                                      labels)
  if config.get("ema_decay", 0.0):
    optimizer = optax.chain(optimizer, parameter_ema(config.ema_decay))
  return optimizer, schedule
