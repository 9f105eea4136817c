"""Pieces every training loop shares: the state, checkpoints, preemption, divergence.

``Checkpointer`` is an Orbax manager over three items: the train state, the
Grain iterator's state and a small JSON ``meta`` (e.g. the stage), so a job
resumes exactly where it stopped; ``Preemption`` turns SIGTERM into a flag the
loop checks so it can save before exiting.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import flax.struct
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class TrainingDiverged(RuntimeError):
  """The loss or the gradients stopped being finite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


class Checkpointer:
  """Orbax manager over the train state, the data iterator state and the stage."""

  def __init__(self, workdir: str, config):
    options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                           create=True, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state, iterator):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"]

  def save(self, step: int, state, iterator, meta: dict, force: bool = False) -> bool:
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
        meta=ocp.args.JsonSave(meta)))

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class Preemption:
  """Turns SIGTERM into a flag the loop checks (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption saves
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)




def check_finite(step: int, metrics: dict) -> None:
  """Raises :class:`TrainingDiverged` naming the metrics that are not finite."""
  bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise TrainingDiverged(f"non-finite values at step {step}: {bad}; lower train.lr, "
                           "raise train.warmup_steps or check the data")
