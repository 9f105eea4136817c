"""Orbit videos from prompts and/or first frames.

``sample_to_folder`` is ``python -m vf3d_jax.sample_video`` as a library
function; ``sample_clips`` is the sampler it calls.

``sample_clips`` runs the whole reverse process as one jitted function: the
text encodings, the first-frame condition, the sampler's ``lax`` loop with
two-way classifier-free guidance (one batched UNet call of three passes a
step: no condition, image only, image and text), and the decoding to frames.
Without a first frame the image condition is the null one, so the guidance
reduces to ordinary text guidance.

With ``replace_first_frame`` the first frame is also held in the sample itself:
before each model call frame 0 of ``x_t`` is set to the first frame noised to
that step's level (``samplers.Known``), as the model saw it in training, where
frame 0 of ``x_t`` is always the noised true first frame; the output's frame 0
is then the given frame.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tqdm

from vf3d_jax.diffusion import guidance
from vf3d_jax.diffusion import samplers
from vf3d_jax.inference import preprocess
from vf3d_jax.inference.pipeline import (check_output, list_images, no_bar, output_names,
                                         write_folder, write_video)
from vf3d_jax.video import model as model_lib
from vf3d_jax.video.model import VideoModel

SAMPLERS = ("ddim", "dpm_solver_pp")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """How to sample (``config.sample`` holds the same fields)."""
  # "ddim" or "dpm_solver_pp" (2M).
  sampler: str = "ddim"
  # Model evaluations (each a batched call of the guidance passes).
  num_steps: int = 25
  # DDIM's eta (0: deterministic).
  eta: float = 0.0
  # Two-way guidance weights.
  image_scale: float = 2.0
  text_scale: float = 5.0
  # Guidance rescale φ (vf3d_jax/diffusion/guidance.py; 0: none).
  guidance_rescale: float = 0.0
  # Hold the first frame in x_t at every step (see the module docstring).
  replace_first_frame: bool = False

  @classmethod
  def from_config(cls, config) -> "SampleOptions":
    return cls(sampler=config.sampler, num_steps=int(config.num_steps), eta=float(config.eta),
               image_scale=float(config.image_scale), text_scale=float(config.text_scale),
               guidance_rescale=float(config.get("guidance_rescale", 0.0)),
               replace_first_frame=bool(config.get("replace_first_frame", False)))

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
    if self.num_steps < 1:
      raise ValueError("num_steps must be at least 1")
    if not 0.0 <= self.guidance_rescale <= 1.0:
      raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample(model: VideoModel, options: SampleOptions, params, encoders, tokens, null_tokens,
            first_frames, has_image, key):
  batch = tokens.shape[0]
  key_noise, key_vae, key_eta, key_known = jax.random.split(key, 4)
  context = model.context(params, encoders, tokens)
  context_null = model.context(params, encoders, null_tokens)
  shape = model.latent_shape(batch)
  if model.spec.unet.condition_channels:
    first = model.encode(encoders, first_frames[:, None], key=key_vae)
    first = jnp.broadcast_to(first, shape)
    condition = model.first_frame_condition(first, has_image)
  else:  # a text-only model: the condition is ignored by the UNet
    condition = jnp.zeros(shape[:-1] + (1,), jnp.float32)
  apply_fn = lambda x, t, c, cond: model.apply(params, x, t, c, cond)
  model_fn = guidance.guided_model_fn(
      apply_fn, context=context, context_null=context_null, condition=condition,
      condition_null=jnp.zeros_like(condition), image_scale=options.image_scale,
      text_scale=options.text_scale, rescale=options.guidance_rescale)
  x_T = jax.random.normal(key_noise, shape, jnp.float32)
  known = None
  if options.replace_first_frame and model.spec.unet.condition_channels:
    frame0 = (jnp.arange(shape[1]) == 0)[None, :] & has_image[:, None]
    known = samplers.Known(x0=first, mask=frame0.reshape(frame0.shape + (1,) * (len(shape) - 2)),
                           noise=jax.random.normal(key_known, shape, jnp.float32))
  if options.sampler == "ddim":
    latents = samplers.ddim_sample(model_fn, model.schedule, x_T, options.num_steps,
                                   eta=options.eta, key=key_eta if options.eta else None,
                                   known=known)
  else:
    latents = samplers.dpm_solver_pp_sample(model_fn, model.schedule, x_T, options.num_steps,
                                            known=known)
  return model.decode(encoders, latents)


def sample_clips(model: VideoModel, params, encoders, prompts, key, *, first_frames=None,
                 options: SampleOptions = SampleOptions()) -> np.ndarray:
  """Samples one orbit clip per prompt.

  Args:
    model: the video model.
    params, encoders: its trainable and frozen parameters.
    prompts: ``B`` captions ("" for none).
    key: PRNG key (the noise, and the VAE's posterior sample).
    first_frames: ``[B, R, R, 3]`` in [0, 1] to start the orbits from, or None;
      a NaN-filled frame means "no image" for that example.
    options: sampler and guidance settings.

  Returns:
    ``[B, F, R, R, 3]`` float32 frames in [0, 1].
  """
  prompts = list(prompts)
  batch = len(prompts)
  tokens = jnp.asarray(model.tokenize(prompts))
  null_tokens = jnp.asarray(model.tokenize([""]))
  size = model.spec.resolution
  if first_frames is None:
    frames = np.zeros((batch, size, size, 3), np.float32)
    has_image = np.zeros(batch, bool)
  else:
    frames = np.asarray(first_frames, np.float32)
    if frames.shape != (batch, size, size, 3):
      raise ValueError(f"first_frames must be [{batch}, {size}, {size}, 3], got {frames.shape}")
    has_image = ~np.isnan(frames).any(axis=(1, 2, 3))
    frames = np.nan_to_num(frames)
  if has_image.any() and not model.spec.unet.condition_channels:
    raise ValueError("this model has no first-frame conditioning (condition_channels=0)")
  out = _sample(model, options, params, encoders, tokens, null_tokens, jnp.asarray(frames),
                jnp.asarray(has_image), key)
  return np.asarray(out)


def sample_batches(model: VideoModel, params, encoders, prompts, *, seed: int, batch_size: int,
                   first_frames=None, options: SampleOptions = SampleOptions(),
                   progress: bool | None = None, desc: str = "videos"):
  """``sample_clips`` over many prompts, ``batch_size`` at a time, with a progress bar.

  Args:
    model, params, encoders, prompts, first_frames, options: as for
      ``sample_clips`` (``first_frames`` for all prompts, or None).
    seed: batch ``start`` samples with ``fold_in(key(seed), start)``.
    batch_size: clips per call.
    progress: a bar over the clips (True, False, or None: only on a terminal).
    desc: the bar's label.

  Yields:
    ``(start, clips [b, F, R, R, 3])`` for each batch, in order.
  """
  prompts = list(prompts)
  with tqdm.tqdm(total=len(prompts), desc=desc, unit="video", disable=no_bar(progress)) as bar:
    for start in range(0, len(prompts), batch_size):
      part = slice(start, start + batch_size)
      clips = sample_clips(model, params, encoders, prompts[part],
                           jax.random.fold_in(jax.random.key(seed), start),
                           first_frames=None if first_frames is None else first_frames[part],
                           options=options)
      yield start, clips
      bar.update(len(clips))


# `python -m vf3d_jax.sample_video` as a library function (tests and notebooks call it).
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
  and only composites any alpha on white. Either way an image longer than
  ``preprocess.MAX_SIDE`` is area-downscaled first.
  """
  if foreground_ratio > 0:
    return preprocess.preprocess_image(path, size=size, foreground_ratio=foreground_ratio)[0]
  rgba, _, _ = preprocess.load_rgba(path)  # float32 in [0, 1]
  rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
  image = Image.fromarray((rgb * 255).round().astype(np.uint8))
  return np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) / 255.0


def _save_png(path: str, image: np.ndarray) -> None:
  Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)


def _write_clip(folder: str, clip: np.ndarray, first: np.ndarray | None, fps: int) -> None:
  if first is not None:
    _save_png(os.path.join(folder, "input.png"), first)
  for f, frame in enumerate(clip):
    _save_png(os.path.join(folder, f"frame_{f:02d}.png"), frame)
  write_video(clip, os.path.join(folder, "orbit.mp4"), fps)


def sample_to_folder(config, *, model_path: str, output: str, prompts: list[str],
                     image: str = "", seed: int = 0, progress: bool | None = None) -> list[str]:
  """Samples a video per prompt (or per image) into ``output/<name>/``; returns the folders.

  ``<name>`` is ``prompt_XX``, or the image's name as ``vf3d_jax.infer`` names
  it (``output_names``). The model, the images, the sampling settings and
  ``output`` are checked before the model's parameters are loaded. Each
  folder is written under a temporary name and renamed when complete.

  Raises:
    FileNotFoundError, NotADirectoryError, PermissionError, ValueError
    (``CheckpointError``, ``ImageLoadError``): before anything is sampled.
  """
  model_dir = resolve_model_path(model_path)
  spec = model_lib.read_spec(model_dir)
  images = list_images(image) if image else []
  if not prompts and not images:
    raise ValueError("give at least one --prompt or an --image")
  if images and not spec.unet.condition_channels:
    raise ValueError(f"{model_dir}: this model has no first-frame conditioning "
                     "(condition_channels=0); sample it from prompts only")
  options = SampleOptions.from_config(config.sample)
  fps, batch = config.sample.fps, config.sample.batch_size
  for name, value in (("sample.fps", fps), ("sample.batch_size", batch)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
      raise ValueError(f"{name} must be a number >= 1, got {value!r}")
  check_output(output)
  if images:
    prompts = [prompts[min(i, len(prompts) - 1)] if prompts else "" for i in range(len(images))]
    names = output_names(images)
    frames = np.stack([first_frame(p, spec.resolution, float(config.sample.foreground_ratio))
                       for p in tqdm.tqdm(images, desc="first frames", unit="image",
                                          leave=False, disable=no_bar(progress))])
  else:
    names = [f"prompt_{i:02d}" for i in range(len(prompts))]
    frames = None
  model, params = model_lib.load_export(model_dir)
  encoders = model.load_encoders()
  folders = []
  for start, clips in sample_batches(model, params, encoders, prompts, seed=seed,
                                     batch_size=int(batch), first_frames=frames, options=options,
                                     progress=progress):
    for index, clip in enumerate(clips, start):
      folder = os.path.join(output, names[index])
      first = None if frames is None else frames[index]
      write_folder(folder, functools.partial(_write_clip, clip=clip, first=first, fps=int(fps)))
      tqdm.tqdm.write(f"{names[index]}: {prompts[index]!r} -> {folder}", file=sys.stdout)
      folders.append(folder)
  return folders
