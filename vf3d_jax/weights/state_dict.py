"""Reading flat ``name -> array`` state dicts from checkpoint files.

Two formats, recognised by their bytes rather than their extension:

* safetensors (read with the ``safetensors`` package, no torch needed);
* PyTorch pickles (zip or legacy), read with ``torch.load(weights_only=True)``;
  torch is imported only then. A pickle holding ``{"model_state_dict": ...}``
  (the released training checkpoints) or ``{"state_dict": ...}`` is unwrapped.

Every failure is a :class:`CheckpointError` whose message names the file and
the problem in one line.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint file that cannot be used, with a one-line reason."""


def _detect_format(path: str) -> str:
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(16)
  if head[:2] == b"PK" or head[:2] == b"\x80\x02":  # zip (torch >= 1.6) or legacy pickle
    return "torch"
  if len(head) >= 9:
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and 8 + header_len <= size:
      return "safetensors"
    if head[8:9] == b"{":
      raise CheckpointError(f"{path}: truncated safetensors file (header says {header_len} bytes, "
                            f"file has {size - 8})")
  raise CheckpointError(f"{path}: not a safetensors file or a PyTorch checkpoint")


def _safetensors_header(path: str) -> tuple[dict, int]:
  """The JSON header of a safetensors file, and its length in bytes."""
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  return header, header_len  # a dict: _detect_format saw its "{"


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  header, header_len = _safetensors_header(path)
  end = 0
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
      raise CheckpointError(f"{path}: corrupt safetensors header (tensor {name!r} has no "
                            "data_offsets [begin, end])")
    end = max(end, offsets[1])
  if 8 + header_len + end > os.path.getsize(path):
    raise CheckpointError(f"{path}: truncated safetensors file (needs {8 + header_len + end} bytes, "
                          f"has {os.path.getsize(path)})")
  try:
    return load_file(path)
  except (SafetensorError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f"{path}: reading a PyTorch checkpoint needs torch "
                          "(pip install 'vf3d_jax[torch]'), or convert it to safetensors") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many kinds for corrupt files
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({reason})") from None
  for wrapper in ("model_state_dict", "state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise CheckpointError(f"{path}: PyTorch checkpoint holds no state dict of tensors")
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into ``{key: numpy array}``."""
  path = os.fspath(path)
  fmt = _detect_format(path)
  return _read_safetensors(path) if fmt == "safetensors" else _read_torch(path)


DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def diffusers_weights_file(path: str | os.PathLike, component: str) -> str:
  """The weights file of a diffusers component (``"unet"``, ``"vae"``).

  ``path`` is the file itself, the component's folder, or a pipeline folder
  holding ``<component>/``.

  Raises:
    CheckpointError: a folder without ``diffusion_pytorch_model.*``.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    return path
  if os.path.isdir(os.path.join(path, component)):  # the pipeline folder
    path = os.path.join(path, component)
  for name in DIFFUSERS_WEIGHT_FILES:
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name)
  raise CheckpointError(f"{path}: no {' or '.join(DIFFUSERS_WEIGHT_FILES)}")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The ``__metadata__`` strings of a safetensors file (``{}`` for other formats)."""
  path = os.fspath(path)
  if _detect_format(path) != "safetensors":
    return {}
  metadata = _safetensors_header(path)[0].get("__metadata__") or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a "
                          "string-to-string object)")
  return dict(metadata)


def write_safetensors(state: dict[str, np.ndarray], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
  """Writes a state dict as safetensors, atomically (temp file, then rename)."""
  from safetensors.numpy import save_file

  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
