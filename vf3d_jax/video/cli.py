"""``python -m vf3d_jax.sample_video`` as a library function (tests and notebooks call it)."""

from __future__ import annotations

import os

from absl import logging
import jax
import numpy as np
from PIL import Image

from vf3d_jax.inference import preprocess
from vf3d_jax.inference.pipeline import list_images, write_video
from vf3d_jax.video import model as model_lib
from vf3d_jax.video import sampling


def resolve_model_path(path: str) -> str:
  """An export directory, or a training workdir holding one."""
  if model_lib.is_export(path):
    return path
  export = os.path.join(path, "export")
  if model_lib.is_export(export):
    return export
  raise FileNotFoundError(f"{path}: not an exported video model (no {model_lib.SPEC_FILE}), nor "
                          "a finished training workdir with export/")


def first_frame(path: str, size: int, foreground_ratio: float) -> np.ndarray:
  """``[size, size, 3]`` in [0, 1]: an image as a first frame.

  ``foreground_ratio > 0`` matts (if opaque) and recentres the object to that
  fraction of the frame, as ``vf3d_jax.infer`` does; ``0`` keeps the framing
  and only composites any alpha on white.
  """
  if foreground_ratio > 0:
    return preprocess.preprocess_image(path, size=size, foreground_ratio=foreground_ratio)[0]
  rgba = preprocess.to_rgba(preprocess.load_image(path)).astype(np.float32) / 255.0
  rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
  image = Image.fromarray((rgb * 255).round().astype(np.uint8))
  return np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) / 255.0


def _save_png(path: str, image: np.ndarray) -> None:
  tmp = path + ".tmp.png"
  Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(tmp)
  os.replace(tmp, path)


def sample_to_folder(config, *, model_path: str, output: str, prompts: list[str],
                     image: str = "", seed: int = 0) -> list[str]:
  """Samples a video per prompt (or per image) into ``output/<name>/``; returns the folders."""
  model, params = model_lib.load_export(resolve_model_path(model_path))
  encoders = model.load_encoders()
  size = model.spec.resolution
  images = list_images(image) if image else []
  if not prompts and not images:
    raise ValueError("give at least one --prompt or an --image")
  if images:
    prompts = [prompts[min(i, len(prompts) - 1)] if prompts else "" for i in range(len(images))]
    names = [os.path.splitext(os.path.basename(p))[0] for p in images]
    frames = np.stack([first_frame(p, size, float(config.sample.foreground_ratio))
                       for p in images])
  else:
    names = [f"prompt_{i:02d}" for i in range(len(prompts))]
    frames = None
  options = sampling.SampleOptions.from_config(config.sample)
  batch = max(1, int(config.sample.batch_size))
  folders = []
  for start in range(0, len(prompts), batch):
    chunk = slice(start, start + batch)
    key = jax.random.fold_in(jax.random.key(seed), start)
    clips = sampling.sample_clips(model, params, encoders, prompts[chunk], key,
                                  first_frames=None if frames is None else frames[chunk],
                                  options=options)
    for i, clip in enumerate(clips):
      index = start + i
      folder = os.path.join(output, names[index])
      os.makedirs(folder, exist_ok=True)
      if frames is not None:
        _save_png(os.path.join(folder, "input.png"), frames[index])
      for f, frame in enumerate(clip):
        _save_png(os.path.join(folder, f"frame_{f:02d}.png"), frame)
      write_video(clip, os.path.join(folder, "orbit.mp4"), int(config.sample.fps))
      logging.info("%s: %r -> %s", names[index], prompts[index], folder)
      folders.append(folder)
  return folders
