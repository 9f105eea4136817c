"""Pretrained LRMs on disk: our Orbax format, and one loader for every format.

Our format is a directory::

  <dir>/arch.json   the LRMArch (see vf3d_jax.models.lrm)
  <dir>/params/     an Orbax checkpoint of the float32 parameter tree

It is written to ``<dir>.tmp-<pid>`` and renamed into place, so an interrupted
conversion leaves no directory that looks complete.

:func:`load_lrm` accepts that directory, the released ``model.safetensors`` or
a PyTorch pickle with a ``model_state_dict``.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vf3d_jax.models.lrm import LRMArch, param_shapes
from vf3d_jax.weights.state_dict import CheckpointError
from vf3d_jax.weights.vfusion3d import arch_from_json, load_checkpoint_file

ARCH_FILE = "arch.json"
PARAMS_DIR = "params"


def write_model_dir(directory: str | os.PathLike, meta: dict[str, dict], params) -> str:
  """Writes JSON files (``meta``: file name -> content) and an Orbax ``params/``
  into a new directory, atomically (via ``<dir>.tmp-<pid>`` and a rename)."""
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} already exists; remove it or choose another --output")
  tmp = f"{directory}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    for name, content in meta.items():
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(content, f, indent=2)
    # This process writes alone, also in a multi-process run (where process 0 exports).
    this = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=this, active_processes={this})
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=alone)
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), jax.tree.map(np.asarray, params))
    checkpointer.wait_until_finished()
    os.rename(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory


def restore_params(directory: str | os.PathLike, shapes):
  """The ``params/`` of a model directory, restored to the tree ``shapes``."""
  directory = os.path.abspath(os.fspath(directory))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
  try:
    return ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR), target)
  except Exception as e:  # orbax raises several kinds for damaged directories
    raise CheckpointError(f"{directory}: cannot restore parameters ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def save_pretrained(directory: str | os.PathLike, arch: LRMArch, params) -> str:
  """Writes ``arch`` and ``params`` as our pretrained directory; returns its path."""
  return write_model_dir(directory, {ARCH_FILE: arch.to_dict()}, params)


def is_pretrained_dir(path: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(path, ARCH_FILE))


def load_pretrained(directory: str | os.PathLike):
  """Reads our pretrained directory: ``(arch, params)`` with jax array leaves."""
  directory = os.path.abspath(os.fspath(directory))
  if not is_pretrained_dir(directory):
    raise CheckpointError(f"{directory}: not a vf3d_jax pretrained directory (no {ARCH_FILE})")
  path = os.path.join(directory, ARCH_FILE)
  with open(path, "rb") as f:
    arch = arch_from_json(f.read(), path)
  return arch, restore_params(directory, param_shapes(arch))


def load_lrm(path: str | os.PathLike, **arch_overrides):
  """Loads an LRM from any supported format: ``(arch, params)``.

  Args:
    path: our pretrained directory, a ``.safetensors`` file or a PyTorch pickle.
    **arch_overrides: passed to ``infer_arch`` for checkpoint files
      (``encoder_heads``, ``heads``, ``input_size``, ``pos_resize``).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return load_pretrained(path)
  arch, params = load_checkpoint_file(path, **arch_overrides)
  return arch, jax.tree.map(jnp.asarray, params)
