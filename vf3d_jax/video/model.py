"""The video model as one object: UNet, text encoder, latent space and noise schedule.

A :class:`VideoSpec` says what the model is (JSON-able, stored with every
export); :class:`VideoModel` builds the pieces from it and holds the pure
functions the trainer and the sampler share:

* ``encode(encoders, frames)`` / ``decode(encoders, latents)``: frames
  ``[B, F, R, R, 3]`` in ``[0, 1]`` <-> the diffusion space (``[-1, 1]``
  pixels, or scaled VAE latents);
* ``context(params, encoders, tokens)``: text embeddings ``[B, L, D]``;
* ``first_frame_condition(latents, keep)``: the first-frame conditioning input,
  the first frame's latent at frame 0 and zeros elsewhere, plus a frame mask
  channel (1 at frame 0), zeroed for examples with ``keep = False``;
* ``apply(params, x_t, t, context, condition)``: the UNet.

Parameters come in two trees: ``params`` (``{"unet": ...}`` plus ``"text"`` for
the trainable word-level encoder), which training updates (the parts the
config allows), and ``encoders`` (``{"vae": ..., "clip": ...}`` where used),
pretrained and always frozen.

An export directory (``<workdir>/export``) holds ``video_model.json`` (the
spec) and ``params/`` (Orbax); the VAE and CLIP weights stay where the spec's
paths point.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax import pretrained
from vf3d_jax.diffusion import schedule as schedule_lib
from vf3d_jax.models import text as text_lib
from vf3d_jax.models import unet as unet_lib
from vf3d_jax.models import vae as vae_lib
from vf3d_jax.weights import sd_unet
from vf3d_jax.weights import sd_vae
from vf3d_jax.weights.rules import flat, unflat
from vf3d_jax.weights.state_dict import (CheckpointError, diffusers_weights_file,
                                         read_state_dict)

SPEC_FILE = "video_model.json"


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  """Everything that defines a video model except its parameters."""
  # The UNet (with or without its temporal adapters).
  unet: unet_lib.UNetArch
  # Text encoder: kind ("words" | "clip"), path, vocab_size, max_length, width.
  text: dict
  # Diffusion space: kind ("pixel" | "vae"), vae (path), chunk.
  latent: dict
  # make_schedule arguments (and the loss weighting).
  diffusion: dict
  # Frame side in pixels and frames per clip.
  resolution: int
  num_frames: int

  def to_dict(self) -> dict:
    return {"unet": self.unet.to_dict(), "text": dict(self.text), "latent": dict(self.latent),
            "diffusion": dict(self.diffusion), "resolution": self.resolution,
            "num_frames": self.num_frames}

  @classmethod
  def from_dict(cls, d: dict) -> "VideoSpec":
    return cls(unet=unet_lib.UNetArch.from_dict(d["unet"]), text=dict(d["text"]),
               latent=dict(d["latent"]), diffusion=dict(d["diffusion"]),
               resolution=int(d["resolution"]), num_frames=int(d["num_frames"]))


def _word_text(spec: VideoSpec) -> text_lib.WordText:
  return text_lib.WordText(vocab_size=spec.text["vocab_size"],
                           max_length=spec.text["max_length"], width=spec.text["width"])


def param_shapes(spec: VideoSpec) -> dict:
  """The trainable parameters' shapes, without building the frozen encoders."""
  shapes = {"unet": unet_lib.param_shapes(spec.unet)}
  if spec.text["kind"] == "words":
    shapes["text"] = jax.eval_shape(_word_text(spec).init, jax.random.key(0))
  return shapes


def spec_from_config(config) -> VideoSpec:
  """The spec a ``configs/video.py`` config describes."""
  return VideoSpec(unet=unet_lib.UNetArch.from_dict(config.model.to_dict()),
                   text=config.text.to_dict(), latent=config.latent.to_dict(),
                   diffusion=config.diffusion.to_dict(),
                   resolution=int(config.data.frame_resolution),
                   num_frames=int(config.data.num_frames))


class VideoModel:
  """The pieces a spec describes, and the pure functions over them."""

  def __init__(self, spec: VideoSpec, dtype=jnp.float32, remat: bool = False):
    self.spec = spec
    self.unet = unet_lib.UNet(spec.unet, dtype=dtype, remat=remat)
    self.schedule = schedule_lib.make_schedule(
        num_train_timesteps=spec.diffusion["num_train_timesteps"],
        beta_schedule=spec.diffusion["beta_schedule"], beta_start=spec.diffusion["beta_start"],
        beta_end=spec.diffusion["beta_end"],
        zero_terminal_snr=spec.diffusion["zero_terminal_snr"],
        prediction_type=spec.diffusion["prediction_type"])
    kind = spec.text["kind"]
    if kind == "words":
      self.text = _word_text(spec)
    elif kind == "clip":
      if not spec.text.get("path"):
        raise ValueError("text.kind='clip' needs text.path: a folder with text_encoder/ and "
                         "tokenizer/ (a Stable Diffusion 1.5 download)")
      self.text = text_lib.CLIPText.from_pretrained(spec.text["path"])
    else:
      raise ValueError(f"text.kind must be 'words' or 'clip', got {kind!r}")
    if self.text.width != spec.unet.cross_attention_dim:
      raise ValueError(f"text width {self.text.width} != UNet cross_attention_dim "
                       f"{spec.unet.cross_attention_dim}")
    latent = spec.latent["kind"]
    self.vae = None
    if latent == "vae":
      if not spec.latent.get("vae"):
        raise ValueError("latent.kind='vae' needs latent.vae: a diffusers vae/ folder or file")
      # The VAE's weights are read once, here: its architecture comes with them.
      self.vae_arch, self._vae_params = sd_vae.load_vae(spec.latent["vae"])
      self.vae = vae_lib.AutoencoderKL(self.vae_arch)
      factor = 2 ** (len(self.vae_arch.block_out_channels) - 1)
      self.latent_size = spec.resolution // factor
      channels = self.vae_arch.latent_channels
    elif latent == "pixel":
      self.latent_size, channels = spec.resolution, 3
    else:
      raise ValueError(f"latent.kind must be 'pixel' or 'vae', got {latent!r}")
    if spec.unet.in_channels != channels or spec.unet.out_channels != channels:
      raise ValueError(f"UNet in/out channels ({spec.unet.in_channels}, "
                       f"{spec.unet.out_channels}) must equal the {latent} channels {channels}")
    self.latent_channels = channels
    if spec.unet.condition_channels not in (0, channels + 1):
      raise ValueError(f"condition_channels must be 0 or {channels + 1} (latent + frame mask), "
                       f"got {spec.unet.condition_channels}")

  @property
  def has_text_params(self) -> bool:
    return self.spec.text["kind"] == "words"

  def latent_shape(self, batch: int, frames: int | None = None) -> tuple[int, ...]:
    size = self.latent_size
    return (batch, frames or self.spec.num_frames, size, size, self.latent_channels)

  # Parameters.

  def init_params(self, rng) -> dict:
    """Fresh trainable parameters: ``{"unet": ...}`` (+ ``"text"`` for words)."""
    rng_unet, rng_text = jax.random.split(rng)
    params = {"unet": unet_lib.init_params(self.spec.unet, rng_unet, frames=2,
                                           size=self.latent_size)}
    if self.has_text_params:
      params["text"] = self.text.init(rng_text)
    return params

  def param_shapes(self) -> dict:
    return param_shapes(self.spec)

  def load_encoders(self) -> dict:
    """The frozen pretrained parts: ``{"vae": ...}``, ``{"clip": ...}`` where used."""
    encoders = {}
    if self.vae is not None:
      encoders["vae"] = jax.tree.map(jnp.asarray, self._vae_params)
    if not self.has_text_params:
      encoders["clip"] = self.text.params
    return encoders

  # Pure functions.

  def text_params(self, params, encoders):
    return params["text"] if self.has_text_params else encoders["clip"]

  def context(self, params, encoders, tokens: jax.Array) -> jax.Array:
    """``[B, L]`` tokens -> ``[B, L, D]`` float32 text embeddings."""
    return self.text.apply(self.text_params(params, encoders), tokens)

  def tokenize(self, prompts) -> np.ndarray:
    return self.text.tokenize(list(prompts))

  def encode(self, encoders, frames: jax.Array, key=None) -> jax.Array:
    """``[B, F, R, R, 3]`` frames in [0, 1] -> diffusion-space ``[B, F, r, r, c]``."""
    x = 2.0 * frames - 1.0
    if self.vae is None:
      return x
    return vae_lib.encode_frames(self.vae, encoders["vae"], x, key,
                                 chunk_size=int(self.spec.latent.get("chunk", 4)))

  def decode(self, encoders, latents: jax.Array) -> jax.Array:
    """Diffusion-space ``[B, F, r, r, c]`` -> frames ``[B, F, R, R, 3]`` in [0, 1]."""
    x = latents if self.vae is None else vae_lib.decode_frames(
        self.vae, encoders["vae"], latents, chunk_size=int(self.spec.latent.get("chunk", 4)))
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)

  def first_frame_condition(self, latents: jax.Array, keep: jax.Array) -> jax.Array:
    """``[B, F, r, r, c]`` latents, ``[B]`` bool -> ``[B, F, r, r, c + 1]`` condition.

    Frame 0 carries the first frame's latent and a mask of ones; the other
    frames are zeros. Examples with ``keep = False`` get all zeros (the
    "no image" input of classifier-free guidance).
    """
    batch, frames = latents.shape[:2]
    is_first = (jnp.arange(frames) == 0).astype(latents.dtype)[None, :, None, None, None]
    mask = is_first * keep.astype(latents.dtype)[:, None, None, None, None]
    first = latents[:, :1] * mask
    ones = jnp.ones(latents.shape[:-1] + (1,), latents.dtype)
    return jnp.concatenate([first * jnp.ones_like(latents), ones * mask], axis=-1)

  def apply(self, params, x_t, t, context, condition=None):
    """The UNet's output for ``x_t [B, F, r, r, c]`` at timesteps ``t [B]``."""
    if not self.spec.unet.condition_channels:
      condition = None
    return self.unet.apply({"params": params["unet"]}, x_t, t, context, condition)


# Export directories.

def save_export(directory: str, spec: VideoSpec, params) -> str:
  """Writes ``spec`` and the trainable ``params`` as a model directory."""
  return pretrained.write_model_dir(directory, {SPEC_FILE: spec.to_dict()}, params)


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, SPEC_FILE))


def read_spec(directory: str) -> VideoSpec:
  if not is_export(directory):
    raise CheckpointError(f"{directory}: not a video model directory (no {SPEC_FILE})")
  with open(os.path.join(directory, SPEC_FILE)) as f:
    return VideoSpec.from_dict(json.load(f))


def load_export(directory: str, dtype=jnp.float32) -> tuple[VideoModel, dict]:
  """``(model, params)`` of an export directory."""
  model = VideoModel(read_spec(directory), dtype=dtype)
  return model, pretrained.restore_params(directory, param_shapes(model.spec))


def initial_params(model: VideoModel, rng, *, unet: str = "", motion: str = "") -> dict:
  """Trainable parameters to start a stage from.

  Args:
    model: the model being trained.
    rng: PRNG key for everything not loaded (new adapters, a new model).
    unet: "" (all random), an export directory (ours, e.g. the image stage's),
      or SD 1.5-layout UNet weights (a diffusers ``unet/`` folder or file).
    motion: "" or AnimateDiff motion-module weights for the temporal attention.

  Every parameter of ``model`` comes from exactly one place: the image UNet
  (and the word-level text encoder) from ``unet``, the motion modules from
  ``motion`` when given, the rest (adapters) freshly initialised, which for
  the adapters is the identity.
  """
  fresh = model.init_params(rng)
  if not unet:
    if motion:
      raise ValueError("init.motion needs init.unet (motion modules go on a pretrained UNet)")
    return fresh
  fresh_leaves = flat(fresh)
  loaded: dict[str, Any] = {}
  if is_export(unet):
    # Only the parameters: the source's frozen encoders (VAE, CLIP) are not read.
    source_spec = read_spec(unet)
    source_params = pretrained.restore_params(unet, param_shapes(source_spec))
    if source_spec.text != model.spec.text and model.has_text_params:
      raise ValueError(f"init.unet text encoder {source_spec.text} differs from the "
                       f"config's {model.spec.text}")
    for path, value in flat(source_params).items():
      if path in fresh_leaves:
        if fresh_leaves[path].shape != value.shape:
          raise CheckpointError(f"{unet}: {path} has shape {value.shape}, the model "
                                f"expects {fresh_leaves[path].shape}")
        loaded[path] = value
  else:
    image = sd_unet.image_params_from_state_dict(
        read_state_dict(diffusers_weights_file(unet, "unet")), model.spec.unet)
    loaded.update({f"unet/{k}": v for k, v in flat(image).items()})
  if motion:
    motion_params = sd_unet.motion_params_from_state_dict(
        read_state_dict(diffusers_weights_file(motion, "unet")), model.spec.unet)
    loaded.update({f"unet/{k}": v for k, v in flat(motion_params).items()})
  missing_image = [p for p in fresh_leaves if p not in loaded
                   and p.startswith("unet/") and not unet_lib.is_adapter(p[len("unet/"):])]
  if missing_image:
    raise CheckpointError(f"{unet} lacks image-model parameters: {missing_image[:6]}")
  merged = {p: jnp.asarray(loaded.get(p, v)) for p, v in fresh_leaves.items()}
  return unflat(merged)

