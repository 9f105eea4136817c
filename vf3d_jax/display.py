"""Inline pictures for the notebooks (``notebooks/``): images, frame strips, videos, meshes.

Each function returns an IPython display object; a notebook cell shows it by
ending with it or by passing it to ``IPython.display.display``. Everything is
embedded in the notebook (PNG bytes, ``data:`` URIs, and for meshes trimesh's
viewer, which bundles three.js), so nothing is fetched from the network and
an executed notebook keeps its pictures. Only these display helpers live here;
the work itself is done by the library functions the command-line jobs call.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image


def to_uint8(image) -> np.ndarray:
  """An ``[H, W, C]`` image, float in [0, 1] or uint8, as uint8."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def png_bytes(image) -> bytes:
  """An ``[H, W, C]`` array (or a PIL image) encoded as PNG."""
  if not isinstance(image, Image.Image):
    image = Image.fromarray(to_uint8(image))
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def show_image(image, width: int | None = None, scale: int = 1):
  """An image file (its path), an array or a PIL image as an inline PNG.

  ``scale`` enlarges small images by pixel repetition, so a 32x32 render is
  not a blur in the browser.
  """
  from IPython import display  # pylint: disable=g-import-not-at-top
  if isinstance(image, (str, os.PathLike)):
    image = Image.open(image)
    image.load()
  if scale > 1:
    array = to_uint8(np.asarray(image))
    image = array.repeat(scale, axis=0).repeat(scale, axis=1)
  return display.Image(data=png_bytes(image), format="png", width=width)


def strip(frames, count: int = 8, gap: int = 2) -> np.ndarray:
  """``count`` evenly spaced frames of ``[F, H, W, C]`` side by side (white gaps), uint8."""
  frames = np.asarray(frames)
  picks = np.linspace(0, len(frames), min(count, len(frames)), endpoint=False).astype(int)
  chosen = [to_uint8(frames[i]) for i in picks]
  if gap:
    pad = np.full((chosen[0].shape[0], gap, chosen[0].shape[2]), 255, np.uint8)
    chosen = [part for frame in chosen for part in (frame, pad)][:-1]
  return np.concatenate(chosen, axis=1)


def read_video(path: str) -> np.ndarray:
  """The frames of an mp4 or gif as ``[F, H, W, 3]`` uint8."""
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(path, memtest=False)])


def show_video(path: str, width: int = 256):
  """An mp4 (an HTML5 ``<video>``) or gif (an ``<img>``) embedded as a ``data:`` URI, looping."""
  from IPython import display  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  if path.lower().endswith(".gif"):
    return display.HTML(f'<img src="data:image/gif;base64,{data}" width="{width}">')
  return display.HTML(f'<video width="{width}" controls autoplay loop muted playsinline '
                      f'src="data:video/mp4;base64,{data}"></video>')


def show_mesh(path: str, height: int = 400):
  """An interactive view of a mesh file (GLB, OBJ, PLY): trimesh's three.js viewer in an
  ``<iframe>``, with the mesh embedded, so it works offline; drag to turn it."""
  import trimesh  # pylint: disable=g-import-not-at-top
  from trimesh.viewer import notebook  # pylint: disable=g-import-not-at-top
  scene = trimesh.load(path, force="scene")
  return notebook.scene_to_notebook(scene, height=height)


def timings(seconds: Mapping[str, float]) -> str:
  """A stage | seconds table (with the total) as text, stages in the order they ran."""
  width = max([len(k) for k in seconds] + [5])
  lines = [f"{name:<{width}}  {value:8.2f} s" for name, value in seconds.items()]
  lines.append(f"{'total':<{width}}  {sum(seconds.values()):8.2f} s")
  return "\n".join(lines)


@contextlib.contextmanager
def log_of(*modules: str) -> Iterator[None]:
  """For the ``with`` block: absl's INFO lines from these modules only (e.g. ``"lrm_trainer"``:
  the trainer's progress and evaluation lines), and warnings from everywhere; without the
  checkpointing library's chatter."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  logger = logging.getLogger("absl")

  def keep(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.module in modules

  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)
    absl_logging.set_verbosity(verbosity)
