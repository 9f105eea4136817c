r"""Text -> 3D: prompt -> first frame -> orbit video -> LRM -> turntable and mesh.

``python -m vf3d_jax.infer --prompt "a red cone on a blue box"`` runs it, with
the models named in the config's ``text`` block (``configs/infer.py``):

1. ``text.image_model`` (an image model export, ``train_video`` stage
   ``image``) samples a first frame from the prompt, as EMU Video factorises
   text -> video into text -> image -> video;
2. ``text.video_model`` (the fine-tuned multi-view video model) turns that
   frame into an orbit video, conditioned on the prompt and the frame;
3. the LRM reconstructs the object from the first frame (matted and
   recentred as any image is, ``preprocess``), and renders its turntable and
   mesh as ``vf3d_jax.infer`` does for an image.

For each prompt ``out/<name>/`` receives what an image gets
(``pipeline.save_reconstruction``: ``input.png``, ``turntable.mp4``,
``mesh.obj``), plus ``first_frame.png`` (the sampled image), ``orbit.mp4``
(the sampled orbit video) and ``prompt.txt``. ``<name>`` is the prompt as a
file name (:func:`prompt_names`). Folders are written whole or not at all
(``pipeline.write_folder``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image
import tqdm

from vf3d_jax import pretrained
from vf3d_jax.inference import pipeline
from vf3d_jax.inference import preprocess


def prompt_names(prompts: Sequence[str], max_length: int = 48) -> list[str]:
  """One distinct folder name per prompt: lower-case words joined by ``_`` (``-2``... on clashes)."""
  names, taken = [], set()
  for i, prompt in enumerate(prompts):
    name = "_".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:max_length].strip("_")
    name = name or f"prompt_{i:02d}"
    unique, n = name, 2
    while unique in taken:
      unique, n = f"{name}-{n}", n + 1
    taken.add(unique)
    names.append(unique)
  return names


def _resolve(path: str, field: str) -> str:
  from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top
  if not path:
    raise ValueError(f"{field} is empty: text -> 3D needs it (an exported model of "
                     "`python -m vf3d_jax.train_video`; configs/infer.py:demo names the shipped ones)")
  try:
    return sampling.resolve_model_path(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{field}: {e}") from None


def sample_options(config):
  from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top
  return sampling.SampleOptions.from_config(config.text.sample)


def check_text_config(config) -> tuple[str, str]:
  """Checks the ``text`` block before any model loads; returns the two model directories."""
  from vf3d_jax.video import model as model_lib  # pylint: disable=g-import-not-at-top
  image_dir = _resolve(str(config.text.image_model), "text.image_model")
  video_dir = _resolve(str(config.text.video_model), "text.video_model")
  if not model_lib.read_spec(video_dir).unet.condition_channels:
    raise ValueError(f"text.video_model {video_dir}: this model has no first-frame conditioning "
                     "(condition_channels=0); name the video stage's export, not the image stage's")
  sample_options(config)  # raises for a bad sampler, step count or guidance rescale
  fps = config.text.fps
  if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps < 1:
    raise ValueError(f"text.fps must be a number >= 1, got {fps!r}")
  return image_dir, video_dir


@dataclasses.dataclass
class TextTo3D:
  """The loaded image, video and LRM models of one config."""

  image_model: Any
  image_params: Any
  image_encoders: Any
  video_model: Any
  video_params: Any
  video_encoders: Any
  reconstructor: pipeline.Reconstructor
  options: Any

  @classmethod
  def load(cls, config, checkpoint: str,
           reconstructor: pipeline.Reconstructor | None = None) -> "TextTo3D":
    """Loads the ``text`` block's models and the LRM of ``checkpoint`` (or uses
    ``reconstructor``, one already loaded with this config)."""
    from vf3d_jax.video import model as model_lib  # pylint: disable=g-import-not-at-top
    image_dir, video_dir = check_text_config(config)
    if reconstructor is None:
      arch, params = pretrained.load_lrm(checkpoint, pos_resize=config.model.pos_resize)
      reconstructor = pipeline.Reconstructor(arch, params, config)
    image_model, image_params = model_lib.load_export(image_dir)
    # The image model samples single frames.
    image_model = model_lib.VideoModel(dataclasses.replace(image_model.spec, num_frames=1))
    video_model, video_params = model_lib.load_export(video_dir)
    return cls(image_model, image_params, image_model.load_encoders(), video_model, video_params,
               video_model.load_encoders(), reconstructor, sample_options(config))

  def first_frame(self, prompt: str, key: jax.Array) -> np.ndarray:
    """``[R, R, 3]`` in [0, 1]: the image model's picture of ``prompt``."""
    from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top
    options = dataclasses.replace(self.options, replace_first_frame=False)
    clip = sampling.sample_clips(self.image_model, self.image_params, self.image_encoders,
                                 [prompt], key, options=options)
    frame = clip[0, 0]
    size = self.video_model.spec.resolution
    if frame.shape[0] != size:
      image = Image.fromarray(np.round(np.clip(frame, 0, 1) * 255).astype(np.uint8))
      frame = np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) / 255.0
    return frame

  def orbit(self, prompt: str, frame: np.ndarray, key: jax.Array) -> np.ndarray:
    """``[F, R, R, 3]`` in [0, 1]: the video model's orbit around ``frame``."""
    from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top
    return sampling.sample_clips(self.video_model, self.video_params, self.video_encoders,
                                 [prompt], key, first_frames=frame[None],
                                 options=self.options)[0]

  def __call__(self, prompt: str, key: jax.Array, render_key: jax.Array | None,
               progress: bool | None = None):
    """``(first frame, orbit, pipeline.Reconstruction)`` of one prompt."""
    k_frame, k_orbit = jax.random.split(key)
    start = time.perf_counter()
    frame = self.first_frame(prompt, k_frame)
    frame_s = time.perf_counter() - start
    start = time.perf_counter()
    orbit = self.orbit(prompt, frame, k_orbit)
    orbit_s = time.perf_counter() - start
    result = self.reconstructor(frame, render_key, progress)
    result.seconds = {"first frame": frame_s, "orbit video": orbit_s, **result.seconds}
    return frame, orbit, result


def save_outputs(folder: str, prompt: str, frame: np.ndarray, orbit: np.ndarray, result, config,
                 save_arrays: bool) -> list[str]:
  """Writes one prompt's outputs into ``folder`` (see the module docstring); returns the paths."""
  written = pipeline.save_reconstruction(result, folder, config, save_arrays)
  path = os.path.join(folder, "first_frame.png")
  Image.fromarray(np.round(np.clip(frame, 0, 1) * 255).astype(np.uint8)).save(path)
  written.append(path)
  written.append(pipeline.write_video(orbit, os.path.join(folder, "orbit.mp4"),
                                      int(config.text.fps)))
  path = os.path.join(folder, "prompt.txt")
  with open(path, "w") as f:
    f.write(prompt + "\n")
  written.append(path)
  return written


def prompt_keys(config, index: int, deterministic: bool) -> tuple[jax.Array, jax.Array | None]:
  """``(sampling key, renderer key or None)`` of the ``index``-th prompt of a run."""
  prompt_key = jax.random.fold_in(jax.random.key(config.seed), index)
  return (jax.random.fold_in(prompt_key, 0),
          None if deterministic else jax.random.fold_in(prompt_key, 1))


def run(config, checkpoint: str, prompts: Sequence[str], output: str,
        deterministic: bool = False, save_arrays: bool = False,
        progress: bool | None = None) -> dict[str, Any]:
  """Makes an object of every prompt; returns ``{prompt: outputs or error}``.

  The config, the models' folders and ``output`` are checked before anything
  loads. The sampling is seeded by ``config.seed`` and the prompt's position.

  Raises:
    CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError,
    ValueError: before any prompt is processed.
  """
  prompts = [p.strip() for p in prompts]
  if not prompts or not all(prompts):
    raise ValueError("--prompt: give a non-empty prompt")
  pipeline.validate_config(config)
  check_text_config(config)
  pipeline.check_output(output)
  with jax.default_matmul_precision(config.get("precision", "highest")):
    models = TextTo3D.load(config, checkpoint)
    results = {}
    names = prompt_names(prompts)
    for index, (prompt, name) in enumerate(tqdm.tqdm(list(zip(prompts, names)), desc="prompts",
                                                     unit="prompt", disable=pipeline.no_bar(progress))):
      folder = os.path.join(output, name)
      sample_key, render_key = prompt_keys(config, index, deterministic)
      try:
        frame, orbit, result = models(prompt, sample_key, render_key, progress)
        written = pipeline.write_folder(folder, functools.partial(
            save_outputs, prompt=prompt, frame=frame, orbit=orbit, result=result, config=config,
            save_arrays=save_arrays))
      except (preprocess.EmptyForegroundError, ValueError, OSError) as e:
        tqdm.tqdm.write(f"{prompt!r}: error: {e}", file=sys.stderr)
        results[prompt] = {"error": str(e)}
        continue
      written = [os.path.join(folder, os.path.basename(p)) for p in written]
      tqdm.tqdm.write(f"{prompt!r} -> {folder}: {pipeline.summary(result)}", file=sys.stdout)
      results[prompt] = {"folder": folder, "files": written, "seconds": result.seconds,
                         "mesh_error": result.mesh_error}
  return results
