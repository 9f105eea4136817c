"""Metrics to a JSONL file and TensorBoard (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def drop_after(path: str, step: int) -> int:
  """Removes the lines of a ``metrics.jsonl`` logged after ``step``; returns how many."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      logged = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
      continue
    if logged <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return len(lines) - len(kept)


class MetricWriter:
  """Appends ``{"step": s, **scalars}`` lines to ``metrics.jsonl`` and TensorBoard events.

  A run resumed from step ``resume_step`` first drops what it logged after
  that step before it stopped (the steps it will train again): the JSONL lines
  here, the TensorBoard events with TensorBoard's ``purge_step``.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None:
        drop_after(path, resume_step)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=None if resume_step is None else resume_step + 1)
      self._jsonl = open(path, "a")

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> list[str]:
    """Writes ``[H, W, 3]`` float images in [0, 1] as PNGs under ``images/`` and to TensorBoard."""
    if not self.enabled:
      return []
    folder = os.path.join(self.workdir, "images")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, image in images.items():
      data = (np.clip(np.asarray(image, np.float32), 0, 1) * 255).round().astype(np.uint8)
      path = os.path.join(folder, f"{name}_{int(step):07d}.png")
      tmp = path + ".tmp.png"
      Image.fromarray(data).save(tmp)
      os.replace(tmp, path)
      paths.append(path)
      self._tb.add_image(name, data, int(step), dataformats="HWC")
    return paths

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
