"""Metrics to a JSONL file and TensorBoard (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


class MetricWriter:
  """Appends ``{"step": s, **scalars}`` lines to ``metrics.jsonl`` and TensorBoard events."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

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
