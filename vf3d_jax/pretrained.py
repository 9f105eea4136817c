"""Pretrained LRMs on disk: our Orbax format, and one loader for every format.

Our format is a directory::

  <dir>/arch.json   the LRMArch (see vf3d_jax.models.lrm)
  <dir>/params/     an Orbax checkpoint of the float32 parameter tree

It is written to ``<dir>.tmp-<pid>`` and renamed into place, so an interrupted
conversion leaves no directory that looks complete.

:func:`load_lrm` accepts that directory, the released ``model.safetensors`` or
a PyTorch pickle with a ``model_state_dict``; :func:`find_released` finds the
released weights (a local copy, the Hugging Face cache or a download).
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


# The released VFusion3D weights on the Hugging Face Hub, and where a local copy usually sits
# (the README's names: the downloaded file, or tools.convert_vfusion3d's output directory).
RELEASED_REPO = "facebook/vfusion3d"
RELEASED_FILE = "model.safetensors"
RELEASED_ENV = "VF3D_RELEASED_WEIGHTS"
LOCAL_RELEASED = ("checkpoints/vfusion3d", "checkpoints/model.safetensors", "model.safetensors")


def _released_here(path: str) -> bool:
  return is_pretrained_dir(path) if os.path.isdir(path) else os.path.isfile(path)


def find_released(search: tuple[str, ...] | list[str] | None = None, download: bool = True,
                  cache_dir: str | None = None) -> str:
  """The released VFusion3D weights: a local copy, the Hugging Face cache, or a download.

  Looked for in order: ``$VF3D_RELEASED_WEIGHTS``; each path of ``search``
  (default :data:`LOCAL_RELEASED`, relative to the working directory), a
  ``model.safetensors`` or a ``tools.convert_vfusion3d`` directory; the
  Hugging Face cache's ``facebook/vfusion3d/model.safetensors``; then, with
  ``download``, ``huggingface_hub.hf_hub_download`` of it (about 1.8 GB;
  ``HF_HUB_OFFLINE=1`` keeps it offline). Whatever is found is a path
  :func:`load_lrm` reads.

  Raises:
    FileNotFoundError: none of these has them; the message says why on one line
      (offline, a missing package, no copy), so a caller can fall back to the
      demo model (``vf3d_jax.inference.pipeline.DEMO_CHECKPOINT``).
  """
  named = os.environ.get(RELEASED_ENV, "")
  if named:
    if not _released_here(named):
      raise FileNotFoundError(f"${RELEASED_ENV}={named}: no such file or pretrained directory")
    return named
  for path in LOCAL_RELEASED if search is None else search:
    if _released_here(path):
      return path
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError("no local copy of the released weights, and huggingface_hub "
                            "is not installed to fetch them") from None
  cached = huggingface_hub.try_to_load_from_cache(RELEASED_REPO, RELEASED_FILE,
                                                  cache_dir=cache_dir)
  if isinstance(cached, str) and os.path.isfile(cached):
    return cached
  if not download:
    raise FileNotFoundError(f"no local copy of the released weights (looked in "
                            f"{', '.join(LOCAL_RELEASED if search is None else search)} and the "
                            f"Hugging Face cache); downloading is off")
  try:
    return huggingface_hub.hf_hub_download(RELEASED_REPO, RELEASED_FILE, cache_dir=cache_dir)
  except Exception as e:  # offline, gated, removed, disk full: all mean "not available here"
    message = " ".join(str(e).split())[:200] or type(e).__name__
    raise FileNotFoundError(f"cannot download {RELEASED_REPO}/{RELEASED_FILE} "
                            f"({type(e).__name__}: {message})") from None
