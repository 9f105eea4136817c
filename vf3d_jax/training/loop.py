"""Pieces every training loop shares: the state, checkpoints, resuming, preemption, progress.

``Checkpointer`` is an Orbax manager over three items: the train state, the
Grain iterator's state and a small JSON ``meta`` (the step, the stage, and the
run: its whole config, architecture included, and its learning-rate
schedule), so a job resumes exactly where it stopped; it refuses to save a
state that is not finite. ``resolve_resume`` compares the config of a new
start with the checkpoint's and refuses a changed run unless asked
(``RESUME_MODES``); ``record_start`` keeps the history of a workdir's starts
with their provenance. ``Preemption`` turns SIGTERM into a flag the loop
checks so it can save before exiting.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
from typing import Any

from absl import logging
import flax.struct
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vf3d_jax.training import optim


class TrainingDiverged(RuntimeError):
  """The loss, the gradients or the train state stopped being finite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# How a start treats a checkpoint made with another config:
# "check": refuse any change (but FREE_FIELDS);
# "extend": only train.steps may grow; the schedule keeps its decay and its
#   final learning rate holds for the added steps;
# "change": take the new config as it is; the schedule follows it (more
#   train.steps stretch the cosine: a warm restart).
RESUME_MODES = ("check", "extend", "change")
RESUME_HELP = ("What a start does with a checkpoint made with another config: check (refuse it), "
               "extend (only a larger train.steps: the added steps run at the schedule's final "
               "learning rate), change (take the new config; the schedule follows it).")
# Fields a resumed run may change in any mode: how often it logs, evaluates,
# samples and saves, and how the same computation is laid out (devices,
# sharding, rematerialisation, chunk sizes). None changes what is trained.
FREE_FIELDS = re.compile(
    r"(num_devices|attention_impl|data\.eval|eval\..*|sample\..*|latent\.chunk|"
    r"train\.(log_every|eval_every|checkpoint_every|keep_checkpoints|sample_every|fsdp|remat|"
    r"remat_renderer|render_chunk))")
# Matmul precisions of ``config.precision`` (jax.default_matmul_precision names).
PRECISIONS = ("default", "high", "highest")


def matmul_precision(config):
  """The context of a job's matmuls: ``config.precision`` ("highest": float32
  matmuls are float32 on every device; "default" lets GPUs use TF32 and TPUs
  bfloat16 passes)."""
  precision = config.get("precision", "highest")
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
  return jax.default_matmul_precision(precision)


def config_dict(config) -> dict:
  """A config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """``{field: (old, new)}`` of the fields both configs have and that differ, but FREE_FIELDS."""
  old, new = _flat(old), _flat(new)
  return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
          if old[k] != new[k] and not FREE_FIELDS.fullmatch(k)}


def _listed(changes: dict) -> str:
  return ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())


@dataclasses.dataclass(frozen=True)
class Resume:
  """What a start of a training job continues, and with which schedule."""

  step: int | None  # the checkpoint it resumes (None: a new run)
  decay_steps: int  # where the learning rate's decay ends (optim.learning_rate_schedule)
  mode: str  # one of RESUME_MODES
  changed: dict = dataclasses.field(default_factory=dict)  # accepted changes, {field: (old, new)}


def resolve_resume(config, step: int | None, meta: dict | None, mode: str = "check") -> Resume:
  """Checks a start's config against the checkpoint it resumes (see RESUME_MODES).

  Args:
    config: the config of this start.
    step: the latest checkpoint's step, or None for a new run.
    meta: that checkpoint's ``meta`` (``run_meta`` plus the loop's own keys).
    mode: one of RESUME_MODES.

  Returns:
    The resume, with the schedule's ``decay_steps`` taken from the checkpoint
    unless ``mode="change"``.

  Raises:
    ValueError: a changed config the mode does not allow, in one line that
      names the changed fields and what to pass.
  """
  if mode not in RESUME_MODES:
    raise ValueError(f"resume must be one of {', '.join(RESUME_MODES)}, got {mode!r}")
  steps = int(config.train.steps)
  if step is None:
    if mode != "check":
      logging.warning("resume=%s: no checkpoint in the workdir, starting a new run", mode)
    return Resume(None, steps, mode)
  stored = (meta or {}).get("config")
  if stored is None:  # a checkpoint written before runs were recorded
    logging.warning("the checkpoint at step %d records no config: resuming without checking it",
                    step)
    return Resume(step, steps, mode)
  decay_steps = int(meta["schedule"]["decay_steps"])
  changes = config_changes(stored, config_dict(config))
  if not changes:
    return Resume(step, decay_steps, mode)
  where = f"the run in this workdir (checkpoint at step {step})"
  if mode == "check":
    if set(changes) == {"train.steps"} and steps > changes["train.steps"][0]:
      hint = ("pass --resume=extend to add the steps at the schedule's final learning rate, or "
              "--resume=change to stretch the schedule to the new train.steps (a warm restart)")
    else:
      hint = "pass --resume=change to continue with the new config, or use a new --workdir"
    raise ValueError(f"the config differs from {where}: {_listed(changes)}; {hint}")
  model = {k: v for k, v in changes.items() if k.startswith("model.")}
  if model:
    raise ValueError(f"the model cannot change on resume ({_listed(model)}): its checkpoint holds "
                     "the old architecture; start a new --workdir from its weights instead")
  old = ml_collections.ConfigDict(stored["train"])
  before = float(optim.learning_rate_schedule(old, decay_steps)(step))
  if mode == "extend":
    others = {k: v for k, v in changes.items() if k != "train.steps"}
    if others:
      raise ValueError(f"--resume=extend changes only train.steps, but the config also differs "
                       f"from {where}: {_listed(others)}; pass --resume=change to take these too")
    old_steps = changes["train.steps"][0]
    if steps < old_steps:
      raise ValueError(f"--resume=extend needs more train.steps than the run's {old_steps}, "
                       f"got {steps}; pass --resume=change to shorten the run")
    final = float(optim.learning_rate_schedule(old, decay_steps)(decay_steps))
    logging.warning("extending the run from %d to %d steps at step %d: the learning rate keeps its "
                    "schedule (now %.3g, %.3g from step %d on) and stays %.3g until step %d",
                    old_steps, steps, step, before, final, decay_steps, final, steps)
    return Resume(step, decay_steps, mode, changes)
  after = float(optim.learning_rate_schedule(config.train, steps)(step))
  logging.warning("resuming step %d with a changed config (%s): the learning-rate schedule is "
                  "rebuilt from it (decay over %d steps); at step %d the learning rate goes from "
                  "%.3g to %.3g", step, _listed(changes), steps, step, before, after)
  return Resume(step, steps, mode, changes)


def run_meta(config, resume: Resume) -> dict:
  """What every checkpoint stores of its run: the whole config and the schedule."""
  t = config.train
  return {"config": config_dict(config),
          "schedule": {"kind": "warmup_cosine", "lr": float(t.lr),
                       "warmup_steps": int(t.warmup_steps), "decay_steps": resume.decay_steps,
                       "final_lr_fraction": float(t.final_lr_fraction)}}


PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
            "ml-collections")


def _git(*args: str) -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


def provenance(mesh) -> dict:
  """Where a start ran: the code's git commit, package versions, devices."""
  device = mesh.devices.flat[0]
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"git_commit": _git("rev-parse", "HEAD"),
          "git_dirty": None if status is None else bool(status),
          "python": platform.python_version(), "packages": versions,
          "device_kind": device.device_kind, "platform": device.platform,
          "devices": int(mesh.devices.size), "processes": jax.process_count()}


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def record_start(workdir: str, config, resume: Resume, mesh) -> None:
  """Writes ``config.json`` (the run's config as of this start) and appends the
  start to ``config_history.jsonl``: time, step, resume mode, accepted
  changes, config, schedule and provenance. Process 0 only."""
  if jax.process_index() != 0:
    return
  _write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "start_step": resume.step or 0, "resume": resume.mode,
           "changed": {k: list(v) for k, v in resume.changed.items()},
           **run_meta(config, resume), "provenance": provenance(mesh)}
  with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
    f.write(json.dumps(entry) + "\n")


def check_workdir(workdir: str) -> None:
  """Raises NotADirectoryError when ``workdir`` exists and is not a directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is not a directory")


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every float in ``tree`` is finite (``sum(x * 0)`` is NaN exactly when
  ``x`` holds a NaN or an infinity, and compiles faster than a reduction per leaf)."""
  sums = [jnp.sum(x * 0) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.isfinite(jnp.stack(sums))) if sums else jnp.bool_(True)


class Checkpointer:
  """Orbax manager over the train state, the data iterator state and ``meta``."""

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
    """Saves (collectively: every process calls it); raises TrainingDiverged
    instead of saving a state that is not finite."""
    if not bool(all_finite(state)):
      self.manager.wait_until_finished()
      latest = self.manager.latest_step()
      kept = f"the checkpoint at step {latest} is kept" if latest is not None else "none saved"
      raise TrainingDiverged(f"the train state at step {step} is not finite, so it was not saved "
                             f"({kept}); lower train.lr, raise train.warmup_steps or check the "
                             "data")
    return self.manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
        meta=ocp.args.JsonSave(meta)))

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class Preemption:
  """Turns SIGTERM into a flag the loop checks (save, then exit cleanly).

  With several processes the distributed runtime catches SIGTERM and every
  process stops at the same step (``reached_preemption_sync_point``).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multiprocess = False

  def __enter__(self):
    self._multiprocess = jax.process_count() > 1
    if self._multiprocess:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption saves
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after ``step``: the same answer on every process."""
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def wait_for_processes(name: str, timeout_s: int = 24 * 3600) -> None:
  """With several processes, each waits here until all arrive (e.g. for process 0's samples
  or export: the others would otherwise reach the runtime's shutdown, which waits 5 min)."""
  if jax.process_count() > 1:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    distributed.global_state.client.wait_at_barrier(f"vf3d_jax/{name}", timeout_s * 1000)


def check_finite(step: int, metrics: dict) -> None:
  """Raises :class:`TrainingDiverged` naming the metrics that are not finite."""
  bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise TrainingDiverged(f"non-finite values at step {step}: {bad}; lower train.lr, "
                           "raise train.warmup_steps or check the data")


def duration(seconds: float) -> str:
  """``3725`` -> ``"1h02m05s"``; ``"?"`` when unknown."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{seconds:02d}s"
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def progress(step: int, total: int, steps_per_s: float) -> str:
  """``"step 120/2400 (5%), 1.83 steps/s, ETA 20m46s"``: the head of the periodic log line."""
  eta = (total - step) / steps_per_s if steps_per_s > 0 else math.inf
  return (f"step {step}/{total} ({100 * step // max(total, 1)}%), {steps_per_s:.3g} steps/s, "
          f"ETA {duration(eta)}")
