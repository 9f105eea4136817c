"""Declarative checkpoint conversion: a table of (our path regex, key, transform).

A converter is one table of rules: a regular expression over our parameter
paths (``/``-joined, full match), the checkpoint key it corresponds to (using
the regex groups), and the :class:`Transform` between the checkpoint's tensor
layout and ours. The same table converts both ways, and
:func:`params_from_state_dict` checks the result against the model's shapes,
reporting every missing, unexpected and wrong-shape key at once.

Layouts: PyTorch ``Linear.weight`` is ``(out, in)``, ours ``(in, out)``;
``Conv2d.weight`` is ``(out, in, kh, kw)``, ours ``(kh, kw, in, out)``;
``ConvTranspose2d.weight`` is ``(in, out, kh, kw)``, ours ``(in, kh, kw, out)``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence

import flax.traverse_util
import numpy as np

from vf3d_jax.weights.state_dict import CheckpointError


@dataclasses.dataclass(frozen=True)
class Transform:
  """A layout change between the checkpoint (``load``) and our parameters (``save``)."""

  load: Callable[[np.ndarray], np.ndarray]
  save: Callable[[np.ndarray], np.ndarray]


SAME = Transform(lambda x: x, lambda x: x)
LINEAR = Transform(lambda x: x.T, lambda x: x.T)
CONV = Transform(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))
CONV_TRANSPOSE = Transform(lambda x: x.transpose(0, 2, 3, 1), lambda x: x.transpose(0, 3, 1, 2))

Rule = tuple[str, str, Transform]


class RuleTable:
  """Compiled rules: our parameter path <-> checkpoint key."""

  def __init__(self, rules: Sequence[Rule]):
    self.rules = tuple(rules)
    self._compiled = tuple((re.compile(p), key, t) for p, key, t in self.rules)

  def checkpoint_key(self, path: str) -> tuple[str, Transform]:
    """The checkpoint key and transform of one of our parameter paths."""
    for pattern, key, transform in self._compiled:
      m = pattern.fullmatch(path)
      if m:
        return m.expand(key), transform
    raise KeyError(f"no conversion rule for parameter {path}")


def flat(tree) -> dict[str, object]:
  """A nested parameter tree -> ``{"a/b/c": leaf}``."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def unflat(params: Mapping[str, object]):
  """``{"a/b/c": leaf}`` -> a nested parameter tree."""
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in params.items()})


def key_indices(state: Mapping[str, np.ndarray], prefix: str) -> list[int]:
  """The sorted ``i`` of keys ``<prefix>.<i>.…`` (e.g. the layers of a block list)."""
  pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  return sorted({int(m.group(1)) for k in state for m in [pattern.match(k)] if m})


def key_shape(state: Mapping[str, np.ndarray], key: str, what: str) -> tuple[int, ...]:
  """The shape of ``state[key]``; a missing key means the file is not ``what``."""
  if key not in state:
    raise CheckpointError(f"not {what}: missing key {key}")
  return tuple(state[key].shape)


def _listing(keys: Sequence[str]) -> str:
  return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")


def params_from_state_dict(state: Mapping[str, np.ndarray], table: RuleTable, shapes, *,
                           ignore: Iterable[str] = (), what: str = "checkpoint"):
  """Converts ``state`` to a parameter tree shaped like ``shapes``, strictly.

  Args:
    state: checkpoint key -> array.
    table: the conversion rules.
    shapes: the model's parameter tree (arrays or ``jax.ShapeDtypeStruct``s),
      e.g. from ``jax.eval_shape`` of its init.
    ignore: regexes of checkpoint keys that may be present and are not
      parameters (buffers such as fixed position tables).
    what: how errors name the checkpoint.

  Returns:
    A nested dict of float32 numpy arrays.

  Raises:
    CheckpointError: listing every missing, unexpected and wrong-shape key.
  """
  ignored = [re.compile(p) for p in ignore]
  params, missing, wrong, used = {}, [], [], set()
  for path, spec in flat(shapes).items():
    key, transform = table.checkpoint_key(path)
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    value = transform.load(np.asarray(state[key]))
    if value.shape != tuple(spec.shape):
      wrong.append(f"{key} {tuple(state[key].shape)} (expected "
                   f"{tuple(transform.save(np.zeros(spec.shape, np.int8)).shape)})")
      continue
    params[path] = np.ascontiguousarray(value, dtype=np.float32)
  unexpected = sorted(k for k in set(state) - used if not any(p.fullmatch(k) for p in ignored))
  problems = [f"{name}: {_listing(keys)}"
              for name, keys in (("missing", missing), ("unexpected", unexpected),
                                 ("wrong shape", wrong)) if keys]
  if problems:
    raise CheckpointError(f"{what} does not match the model; " + "; ".join(problems))
  return unflat(params)


def state_dict_from_params(params, table: RuleTable) -> dict[str, np.ndarray]:
  """Our parameters -> a state dict in the checkpoint's layout (float32 numpy)."""
  state = {}
  for path, value in flat(params).items():
    key, transform = table.checkpoint_key(path)
    state[key] = np.ascontiguousarray(transform.save(np.asarray(value, np.float32)))
  return state
