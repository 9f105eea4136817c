"""Optimisers as config data: AdamW with warmup + cosine, clipping, freezing by regex.

Parameter groups are chosen by regular expressions over ``/``-joined parameter
paths (``encoder/layer_3/fc1/kernel``), big_vision style:

* ``frozen``: matching parameters get no updates (and no optimizer state);
* ``trainable`` (optional): when set, only matching parameters train and all
  others are frozen (e.g. the temporal adapters of the video model);
* weight decay applies only to matrices and tables (ndim >= 2), never to biases,
  LayerNorm scales or LayerScale vectors.
"""

from __future__ import annotations

import re

import flax.traverse_util
import jax
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


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to ``lr`` then cosine decay to ``lr * final_lr_fraction`` at ``steps``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=max(config.warmup_steps, 1),
      decay_steps=max(config.steps, config.warmup_steps + 1),
      end_value=config.lr * config.final_lr_fraction)


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW over the trainable parameters of ``params`` (a tree or its shapes).

  Args:
    config: ``lr, warmup_steps, steps, final_lr_fraction, b1, b2, weight_decay,
      grad_clip, frozen`` (a regex; "" freezes nothing) and optionally
      ``trainable`` (a regex; "" or absent trains everything not frozen).
    params: the parameter tree (arrays or ShapeDtypeStructs).
  """
  schedule = learning_rate_schedule(config)
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
  return optimizer, schedule
