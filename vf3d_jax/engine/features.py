"""Per-frame DINOv2 features for the data engine's filters.

VFusion3D's data engine keeps or drops a generated orbit video with an SVM on
DINO features and estimates its elevation with an MLP on DINO features. This
module computes those features; the classifiers are elsewhere.

Feature of one image: the DINOv2 encoder's tokens after its final LayerNorm
(transformers' ``last_hidden_state``; :class:`~vf3d_jax.models.dinov2.Dinov2Encoder`
returns them so), reduced to ``concat(CLS token, mean of the patch tokens)``: a
``[2 * width]`` float32 vector (1536 for ViT-B/14, ``facebook/dinov2-base``).
For videos, :func:`video_features` gives one per frame and :func:`pool_frames`
the first frame's (the elevation MLP's input) and the mean over frames (the
quality SVM's input).

Preprocessing, in JAX inside the jitted forward pass:

1. frames ``[N, H, W, 3]`` float in ``[0, 1]`` (uint8 frames are divided by
   255) are resized to ``input_size x input_size`` (default 224, a multiple of
   the patch size) with ``jax.image.resize(..., "bicubic", antialias=True)``
   (Keys cubic, ``a = -0.5``, widened when downscaling, as PIL's bicubic) and
   clipped to ``[0, 1]``; frames already of that size are not resampled;
2. normalised with the ImageNet mean ``(0.485, 0.456, 0.406)`` and std
   ``(0.229, 0.224, 0.225)`` (done by ``Dinov2Encoder`` itself);
3. the learned position table is resized to the ``input_size / patch`` grid
   as ``EncoderArch.pos_resize`` says: ``"current"`` (transformers >= 4.45,
   ``size=grid``) for ``dinov2:`` folders, the checkpoint's own mode
   (``"legacy"`` for VFusion3D) for ``lrm:``.

This is transformers' ``BitImageProcessor`` for DINOv2 in spirit, not to the
bit: the processor resizes the shortest side to 256 (PIL bicubic, on uint8) and
center-crops 224 x 224, so it sees the central 87.5 % of a square frame; here
the whole frame is resized to ``input_size`` (an orbit's object can reach the
border), in float, and a non-square frame is stretched, not cropped. The
numbers thus differ from features of the Hugging Face pipeline: on a tiny
random DINOv2 the processor's uint8 rounding alone changes them by up to ~4e-3
(cosine 0.999999), its center crop by up to ~0.3 (cosine 0.995). Train and
apply a classifier on features of the same extractor.

Extractors are made from a spec string (:func:`make_extractor`):

* ``"dinov2:<folder>"``: a DINOv2 in the Hugging Face layout, as
  ``Dinov2Model.save_pretrained`` writes ``facebook/dinov2-base``
  (:func:`load_dinov2`);
* ``"lrm:<checkpoint>"``: the image encoder of an LRM checkpoint (any format
  ``vf3d_jax.pretrained.load_lrm`` reads);
* ``"random:<seed>"``: a tiny randomly initialised DINOv2-like encoder, only
  for tests and smoke runs (its features mean nothing);
* others added with :func:`register_extractor`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax.models.dinov2 import Dinov2Encoder, EncoderArch
from vf3d_jax.weights.rules import RuleTable, params_from_state_dict
from vf3d_jax.weights.state_dict import read_state_dict
from vf3d_jax.weights.vfusion3d import dinov2_rules

DEFAULT_REPO = "facebook/dinov2-base"  # named in the how-to-download message
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INPUT_SIZE = 224  # default side of the encoder's input
BATCH_SIZE = 32  # default frames per forward pass

# A standalone Dinov2Encoder's parameters <-> a Dinov2Model's own keys.
HF_DINOV2_TABLE = RuleTable(dinov2_rules("", ""))

# The encoder of "random:<seed>": tests and smoke runs only.
RANDOM_ARCH = EncoderArch(width=32, depth=2, heads=2, mlp_dim=64, patch_size=8, pos_grid=4,
                          pos_resize="current")


def _missing(path: str, what: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"{path}: {what}; expected a local DINOv2 folder ({CONFIG_FILE}, {WEIGHTS_FILE}) as "
      f"Dinov2Model.save_pretrained writes it; get one with `huggingface-cli download "
      f"{DEFAULT_REPO} {CONFIG_FILE} {WEIGHTS_FILE} --local-dir {path}` on a machine with network")


def arch_from_config(config: Mapping[str, Any], *, pos_resize: str = "current",
                     source: str = CONFIG_FILE) -> EncoderArch:
  """The :class:`EncoderArch` of a transformers ``Dinov2Config`` (as a dict).

  Reads ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
  ``mlp_ratio`` (the MLP width is ``int(hidden_size * mlp_ratio)``, as
  transformers computes it), ``patch_size``, ``image_size`` (the position
  grid is ``image_size // patch_size``) and ``layer_norm_eps``, with
  ``Dinov2Config``'s defaults for absent fields.

  Raises:
    ValueError: a variant ``Dinov2Encoder`` does not implement (SwiGLU MLPs of
      ViT-g, another activation, no q/k/v biases, not 3 channels) or
      inconsistent sizes; the message starts with ``source``.
  """
  get = config.get
  unsupported = [f"{name}={get(name)!r}" for name, ok in (
      ("use_swiglu_ffn", not get("use_swiglu_ffn", False)),
      ("hidden_act", get("hidden_act", "gelu") == "gelu"),
      ("qkv_bias", get("qkv_bias", True)),
      ("num_channels", get("num_channels", 3) == 3)) if not ok]
  if unsupported:
    raise ValueError(f"{source}: unsupported DINOv2 variant ({', '.join(unsupported)})")
  try:
    width = int(get("hidden_size", 768))
    patch = int(get("patch_size", 14))
    image_size = get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
      if len(set(image_size)) != 1:
        raise ValueError(f"non-square image_size {image_size}")
      image_size = image_size[0]
    return EncoderArch(width=width, depth=int(get("num_hidden_layers", 12)),
                       heads=int(get("num_attention_heads", 12)),
                       mlp_dim=int(width * get("mlp_ratio", 4)), patch_size=patch,
                       pos_grid=int(image_size) // patch, pos_resize=pos_resize,
                       eps=float(get("layer_norm_eps", 1e-6)))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: bad DINOv2 config ({' '.join(str(e).split())})") from None


def encoder_shapes(arch: EncoderArch):
  """A standalone encoder's parameter tree as ``jax.ShapeDtypeStruct`` leaves."""
  size = arch.patch_size * arch.pos_grid
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda rng, x: Dinov2Encoder(arch).init(rng, x), jax.random.key(0),
                        images)["params"]


def load_dinov2(path: str | os.PathLike, *, pos_resize: str = "current"):
  """Loads a Hugging Face DINOv2 folder into our :class:`Dinov2Encoder`.

  Args:
    path: a folder holding ``config.json`` and ``model.safetensors`` (a
      ``Dinov2Model``'s own keys, as ``save_pretrained`` writes them for
      ``facebook/dinov2-base``); read without torch.
    pos_resize: how the position table is resized to other grids
      (``EncoderArch.pos_resize``); ``"current"`` is transformers' own.

  Returns:
    ``(arch, params)``: the :class:`EncoderArch` and the parameter tree of
    ``Dinov2Encoder(arch)`` (float32 numpy leaves).

  Raises:
    FileNotFoundError: the folder or one of its files is missing (the one-line
      message says how to download the model).
    ValueError: an unsupported config, or weights that do not match it
      (``CheckpointError``, listing missing, unexpected and wrong-shape keys).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise _missing(path, "no such folder")
  config_file, weights_file = (os.path.join(path, f) for f in (CONFIG_FILE, WEIGHTS_FILE))
  for f in (config_file, weights_file):
    if not os.path.isfile(f):
      raise _missing(path, f"no {os.path.basename(f)}")
  with open(config_file, "rb") as f:
    try:
      config = json.load(f)
    except ValueError as e:
      raise ValueError(f"{config_file}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{config_file}: expected a JSON object")
  arch = arch_from_config(config, pos_resize=pos_resize, source=config_file)
  state = read_state_dict(weights_file)
  if not config.get("use_mask_token", True):  # pre-training only; our module declares it
    state.setdefault("embeddings.mask_token", np.zeros((1, arch.width), np.float32))
  params = params_from_state_dict(state, HF_DINOV2_TABLE, encoder_shapes(arch),
                                  what=f"{weights_file} (for {CONFIG_FILE}'s DINOv2)")
  return arch, params


def _pooled_tokens(tokens: jax.Array) -> jax.Array:
  """``[N, 1 + P, D]`` tokens -> ``[N, 2 D]``: the CLS token, then the patch mean."""
  return jnp.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)


def _features(module: Dinov2Encoder, input_size: int, params, frames: jax.Array) -> jax.Array:
  """``[n, H, W, 3]`` float32 in [0, 1] -> ``[n, 2 * width]`` float32."""
  n, height, width, _ = frames.shape
  if (height, width) != (input_size, input_size):
    frames = jax.image.resize(frames, (n, input_size, input_size, 3), "bicubic", antialias=True)
    frames = jnp.clip(frames, 0.0, 1.0)
  tokens = module.apply({"params": params}, frames)  # normalises with the ImageNet statistics
  return _pooled_tokens(tokens.astype(jnp.float32))


class FeatureExtractor:
  """Frames -> per-frame features of a DINOv2 encoder (see the module docstring).

  Attributes:
    name: what the features come from (the spec it was made from), for reports.
    arch: the encoder's shape.
    dim: feature width, ``2 * arch.width``.
    input_size: side of the encoder's square input (frames are resized to it).
    batch_size: frames per forward pass (bounds device memory).
  """

  def __init__(self, arch: EncoderArch, params, *, name: str, input_size: int = INPUT_SIZE,
               batch_size: int = BATCH_SIZE, matmul_precision: str | None = "highest"):
    """Wraps the parameters of ``Dinov2Encoder(arch)``.

    Args:
      arch: the encoder's shape.
      params: its parameter tree (numpy or jax leaves).
      name: what the features come from, for reports.
      input_size: side of the square encoder input; a multiple of the patch size.
      batch_size: frames per forward pass.
      matmul_precision: ``jax.default_matmul_precision`` of the forward pass;
        "highest" gives float32 matmuls on GPU/TPU too, as PyTorch computes
        DINOv2 by default. None: the global setting.

    Raises:
      ValueError: ``input_size`` is not a positive multiple of the patch size,
        or ``batch_size`` is not positive.
    """
    if input_size <= 0 or input_size % arch.patch_size:
      raise ValueError(f"input_size {input_size} is not a positive multiple of the patch size "
                       f"{arch.patch_size}")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.name = name
    self.arch = arch
    self.dim = 2 * arch.width
    self.input_size = int(input_size)
    self.batch_size = int(batch_size)
    self.matmul_precision = matmul_precision
    self.params = jax.tree.map(jnp.asarray, params)
    self._forward = jax.jit(functools.partial(_features, Dinov2Encoder(arch), self.input_size))

  def __repr__(self) -> str:
    return (f"FeatureExtractor({self.name!r}, dim={self.dim}, input_size={self.input_size}, "
            f"batch_size={self.batch_size})")

  def __call__(self, frames) -> np.ndarray:
    """``[N, H, W, 3]`` float in [0, 1] (or uint8) -> ``[N, dim]`` float32 features.

    Frames go through the encoder ``batch_size`` at a time (``min(batch_size,
    N)``; a last partial batch is padded with copies of its last frame, so one
    compiled program serves every batch of a given frame size).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f"frames must be [N, H, W, 3], got shape {tuple(frames.shape)}")
    count = frames.shape[0]
    if count == 0:
      return np.zeros((0, self.dim), np.float32)
    size = min(self.batch_size, count)
    out = []
    for start in range(0, count, size):
      chunk = np.asarray(frames[start:start + size])
      chunk = chunk.astype(np.float32) / 255.0 if chunk.dtype == np.uint8 else chunk.astype(
          np.float32)
      valid = chunk.shape[0]
      if valid < size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - valid, axis=0)])
      with jax.default_matmul_precision(self.matmul_precision):
        features = self._forward(self.params, chunk)
      out.append(np.asarray(features, np.float32)[:valid])
    return np.concatenate(out)


def video_features(extractor: FeatureExtractor, videos) -> np.ndarray:
  """``[B, F, H, W, 3]`` videos -> ``[B, F, D]`` float32 per-frame features."""
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"videos must be [B, F, H, W, 3], got shape {tuple(videos.shape)}")
  b, f = videos.shape[:2]
  return extractor(videos.reshape((b * f,) + tuple(videos.shape[2:]))).reshape(b, f, -1)


class PooledFeatures(NamedTuple):
  """The features the data engine's classifiers take, per video."""

  first: np.ndarray  # [B, D] the first frame's (the elevation MLP's input)
  mean: np.ndarray  # [B, D] the mean over frames (the quality SVM's input)


def pool_frames(features) -> PooledFeatures:
  """``[B, F, D]`` per-frame features -> the first frame's and the frame mean, ``[B, D]`` each."""
  features = np.asarray(features, np.float32)
  if features.ndim != 3 or features.shape[1] == 0:
    raise ValueError(f"features must be [B, F, D] with F > 0, got shape {features.shape}")
  return PooledFeatures(first=features[:, 0], mean=features.mean(axis=1))


# --- Registry of extractor factories -------------------------------------------------------

# A factory takes the text after "<name>:" and the keyword arguments
# input_size, batch_size, and returns a FeatureExtractor.
Factory = Callable[..., FeatureExtractor]
_FACTORIES: dict[str, Factory] = {}


def register_extractor(name: str, factory: Factory, *, replace: bool = False) -> None:
  """Makes ``make_extractor("<name>:<argument>")`` call ``factory(argument, input_size=..,
  batch_size=..)``.

  Raises:
    ValueError: ``name`` is empty or has a ``:``, or is taken (unless ``replace``).
  """
  if not name or ":" in name:
    raise ValueError(f"extractor name must be non-empty without ':', got {name!r}")
  if name in _FACTORIES and not replace:
    raise ValueError(f"feature extractor {name!r} is already registered")
  _FACTORIES[name] = factory


def registered_extractors() -> list[str]:
  """The names :func:`make_extractor` accepts, sorted."""
  return sorted(_FACTORIES)


def make_extractor(spec: str, *, input_size: int = INPUT_SIZE,
                   batch_size: int = BATCH_SIZE) -> FeatureExtractor:
  """A feature extractor from ``"<name>:<argument>"`` (see the module docstring).

  Args:
    spec: e.g. ``"dinov2:/models/dinov2-base"``, ``"lrm:/models/vfusion3d.safetensors"``
      or ``"random:0"``.
    input_size: side of the square encoder input; a multiple of the patch size.
    batch_size: frames per forward pass.

  Raises:
    ValueError: an unknown name (the message lists the registered ones), or
      what the factory raises.
  """
  name, _, argument = spec.partition(":")
  if name not in _FACTORIES:
    raise ValueError(f"unknown feature extractor {name!r} in spec {spec!r}; registered: "
                     f"{', '.join(registered_extractors())} (as '<name>:<argument>')")
  return _FACTORIES[name](argument, input_size=input_size, batch_size=batch_size)


def _dinov2_factory(folder: str, *, input_size: int, batch_size: int) -> FeatureExtractor:
  if not folder:
    raise ValueError("spec 'dinov2:<folder>' needs the folder of a DINOv2 model")
  arch, params = load_dinov2(folder)
  return FeatureExtractor(arch, params, name=f"dinov2:{folder}", input_size=input_size,
                          batch_size=batch_size)


def _lrm_factory(checkpoint: str, *, input_size: int, batch_size: int) -> FeatureExtractor:
  if not checkpoint:
    raise ValueError("spec 'lrm:<checkpoint>' needs the path of an LRM checkpoint")
  # Imported here: the LRM and orbax are needed by this extractor only.
  from vf3d_jax import pretrained  # pylint: disable=g-import-not-at-top

  arch, params = pretrained.load_lrm(checkpoint)
  return FeatureExtractor(arch.encoder, params["encoder"], name=f"lrm:{checkpoint}",
                          input_size=input_size, batch_size=batch_size)


def random_params(shapes, seed: int):
  """Random float32 numpy leaves for a parameter tree of shapes (tests and smoke runs).

  Drawn on the host with NumPy (no compilation), by leaf name: ``kernel``
  ``N(0, 1 / fan_in)``, ``bias`` ``N(0, 0.1^2)``, LayerNorm ``scale`` and
  LayerScale ``layer_scale*`` ``1 + N(0, 0.1^2)``, anything else (tokens,
  position tables) ``N(0, 0.5^2)``.
  """
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    name, shape = path[-1].key, tuple(spec.shape)
    noise = rng.standard_normal(shape).astype(np.float32)
    if name == "kernel":
      return noise / np.float32(np.sqrt(max(int(np.prod(shape[:-1])), 1)))
    if name == "bias":
      return 0.1 * noise
    if name == "scale" or name.startswith("layer_scale"):
      return 1 + 0.1 * noise
    return 0.5 * noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _random_factory(seed: str, *, input_size: int, batch_size: int) -> FeatureExtractor:
  """Tests and smoke runs only: a tiny encoder with random weights."""
  try:
    seed_value = int(seed or 0)
  except ValueError:
    raise ValueError(f"spec 'random:<seed>' needs an integer seed, got {seed!r}") from None
  params = random_params(encoder_shapes(RANDOM_ARCH), seed_value)
  return FeatureExtractor(RANDOM_ARCH, params, name=f"random:{seed_value}",
                          input_size=input_size, batch_size=batch_size)


register_extractor("dinov2", _dinov2_factory)
register_extractor("lrm", _lrm_factory)
register_extractor("random", _random_factory)
