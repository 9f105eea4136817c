"""CLIP image and text similarity of rendered views.

VFusion3D scores single-image 3D reconstruction by two CLIP similarities:

* image similarity: the renders of the reconstruction against the input image,
  ``mean_v cos(E_img(render_v), E_img(reference))``;
* text similarity: the renders against the prompt or caption,
  ``mean_v cos(E_img(render_v), E_txt(text))``.

``E_img`` is CLIP's ``get_image_features`` and ``E_txt`` its
``get_text_features`` (the projected embeddings), each L2-normalised. The
values are raw cosines in ``[-1, 1]``: neither multiplied by 100 nor clipped at
0 as torchmetrics' ``CLIPScore`` is, which is the scale on which the paper
reports its numbers (image similarity ~0.85, text similarity ~0.25). Which
views are averaged is the caller's choice: the evaluator passes the views it
rendered, and the per-view values are available
(:meth:`CLIPScorer.image_similarities`, :meth:`CLIPScorer.text_similarities`).

The model is read from a local Hugging Face folder, the layout
``save_pretrained`` writes for ``openai/clip-vit-large-patch14`` or
``openai/clip-vit-base-patch32``, with transformers' ``FlaxCLIPModel`` and
``CLIPTokenizer``; nothing is downloaded. PyTorch safetensors load without
torch. :attr:`CLIPScorer.name` says which model the numbers come from.

Images are preprocessed in JAX as ``CLIPImageProcessor`` does (read from the
folder's ``preprocessor_config.json``): the shortest side resized to
``size["shortest_edge"]`` (224), a center crop to ``crop_size`` (224 x 224),
then ``(x - mean) / std`` per channel. Square renders are thus resized
directly to 224 x 224. The resampling is ``jax.image.resize(..., "bicubic",
antialias=True)`` on float images, clipped to ``[0, 1]``: the same kernel as
PIL's bicubic (Keys, ``a = -0.5``, widened by the downscale factor; it agrees
with PIL's float-mode resize to ~1e-5), but without the processor's 8-bit
arithmetic. Given uint8 images (or ``images / 255`` of them) the two
preprocessings differ only by PIL rounding and clipping each of its two
resampling passes to uint8: measured at most ~3/255 per pixel, 0.3/255 on
average, which moves CLIP cosines by ~1e-4 (on a tiny random CLIP). The
processor truncates float images to uint8 before resizing; here they are used
as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# CLIPImageProcessor's defaults (OpenAI CLIP's normalisation).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_REPO = "openai/clip-vit-large-patch14"  # named in the how-to-download message
TEXT_LENGTH = 77  # CLIP's context length: prompts are padded / truncated to it
BATCH_SIZE = 32  # images or prompts per forward pass

# Weight files FlaxCLIPModel.from_pretrained reads from a folder, and whether they
# are PyTorch pickles (which need from_pt=True and torch).
_WEIGHTS = (("flax_model.msgpack", False), ("flax_model.msgpack.index.json", False),
            ("model.safetensors", False), ("pytorch_model.bin", True),
            ("pytorch_model.bin.index.json", True))
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
# PIL resampling codes of preprocessor_config.json -> the jax.image.resize kernel.
_RESAMPLE = {1: "lanczos3", 2: "linear", 3: "bicubic"}


def _missing(path: str, what: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"{path}: {what}; expected a local CLIP folder (config.json, model.safetensors or "
      f"flax_model.msgpack, vocab.json, merges.txt, preprocessor_config.json); get one with "
      f"`huggingface-cli download {DEFAULT_REPO} --include '*.json' '*.txt' model.safetensors "
      f"--local-dir {path}` on a machine with network")


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
  """``CLIPImageProcessor``'s resize, center crop and normalisation, in JAX.

  Images are channels-last floats in ``[0, 1]`` (uint8 images are divided by
  255 first).
  """

  # Shortest-edge target (an int, aspect ratio kept) or an exact (height, width);
  # None: no resize.
  resize: int | tuple[int, int] | None = 224
  crop: tuple[int, int] | None = (224, 224)  # center crop (height, width); None: no crop
  mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN  # per channel; None: no normalisation
  std: tuple[float, ...] | None = OPENAI_CLIP_STD
  method: str = "bicubic"  # jax.image.resize method (antialiased)

  @classmethod
  def from_processor(cls, processor) -> "ImagePreprocess":
    """The settings of a transformers ``CLIPImageProcessor``."""
    resize = None
    if processor.do_resize:
      size = processor.size
      if "shortest_edge" in size:
        resize = int(size["shortest_edge"])
      elif "height" in size and "width" in size:
        resize = (int(size["height"]), int(size["width"]))
      else:
        raise ValueError(f"unsupported image processor size {size}")
    crop = None
    if processor.do_center_crop:
      crop = (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
    mean = std = None
    if processor.do_normalize:
      mean = tuple(float(m) for m in np.broadcast_to(processor.image_mean, (3,)))
      std = tuple(float(s) for s in np.broadcast_to(processor.image_std, (3,)))
    resample = int(processor.resample)
    if resample not in _RESAMPLE:
      raise ValueError(f"unsupported resampling {resample} (PIL code); supported: "
                       f"{sorted(_RESAMPLE)}")
    return cls(resize=resize, crop=crop, mean=mean, std=std, method=_RESAMPLE[resample])

  def resized_shape(self, height: int, width: int) -> tuple[int, int]:
    """Height and width after the resize, as ``get_resize_output_image_size``."""
    if self.resize is None:
      return height, width
    if not isinstance(self.resize, int):
      return tuple(self.resize)
    if height <= width:
      return self.resize, int(self.resize * width / height)
    return int(self.resize * height / width), self.resize

  def __call__(self, images: jax.Array) -> jax.Array:
    """``[N, H, W, 3]`` in ``[0, 1]`` (or uint8) -> ``[N, h, w, 3]`` float32 model input.

    ``h, w`` is the crop size (or the resized size without a crop).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [N, H, W, 3], got {images.shape}")
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      x = x / 255.0
    n, height, width, _ = x.shape
    new_h, new_w = self.resized_shape(height, width)
    if (new_h, new_w) != (height, width):
      # PIL's 8-bit output saturates; so does this.
      x = jnp.clip(jax.image.resize(x, (n, new_h, new_w, 3), self.method, antialias=True), 0, 1)
    if self.crop is not None:
      crop_h, crop_w = self.crop
      if crop_h > new_h or crop_w > new_w:
        raise ValueError(f"crop {self.crop} is larger than the resized image {(new_h, new_w)}")
      top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
      x = x[:, top:top + crop_h, left:left + crop_w]
    if self.mean is not None:
      x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    return x


def _normalized(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _cosines(rows: jax.Array, unit: jax.Array) -> np.ndarray:
  """``[V, D]`` unit rows . ``[D]`` unit vector -> ``[V]`` float32 (on the host, in float32)."""
  return np.asarray(rows, np.float32) @ np.asarray(unit, np.float32)


def _image_features(module, pixel_values):
  """``FlaxCLIPModel.get_image_features`` on channels-last pixels."""
  pooled = module.vision_model(pixel_values=pixel_values, deterministic=True)[1]
  return module.visual_projection(pooled)


def _text_features(module, input_ids, attention_mask):
  """``FlaxCLIPModel.get_text_features``."""
  positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape)
  pooled = module.text_model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=positions, deterministic=True)[1]
  return module.text_projection(pooled)


def _embed_images(module, preprocess: ImagePreprocess, params, images):
  pixels = preprocess(images)
  return _normalized(module.apply({"params": params}, pixels, method=_image_features))


def _embed_texts(module, params, input_ids, attention_mask):
  return _normalized(module.apply({"params": params}, input_ids, attention_mask,
                                  method=_text_features))


class CLIPScorer:
  """CLIP image and text embeddings and the similarities of rendered views."""

  def __init__(self, model, tokenizer, preprocess: ImagePreprocess, *, name: str,
               batch_size: int = BATCH_SIZE, matmul_precision: str | None = "highest"):
    """Wraps a ``FlaxCLIPModel`` and its ``CLIPTokenizer``.

    Args:
      model: a transformers ``FlaxCLIPModel``.
      tokenizer: its ``CLIPTokenizer``.
      preprocess: the image preprocessing (the model's processor settings).
      name: the model's name, for reports.
      batch_size: images or prompts per forward pass (bounds memory).
      matmul_precision: ``jax.default_matmul_precision`` of the forward passes;
        "highest" gives float32 matmuls on GPU/TPU too, as PyTorch's CLIP
        computes them by default. None: the global setting.
    """
    self.model = model
    self.tokenizer = tokenizer
    self.preprocess = preprocess
    self.name = name
    self.batch_size = int(batch_size)
    self.matmul_precision = matmul_precision
    self.params = model.params
    limit = model.config.text_config.max_position_embeddings
    self.text_length = int(min(TEXT_LENGTH, tokenizer.model_max_length, limit))
    self.dim = int(model.config.projection_dim)
    self._embed_images = jax.jit(functools.partial(_embed_images, model.module, preprocess))
    self._embed_texts = jax.jit(functools.partial(_embed_texts, model.module))

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, dtype: jnp.dtype = jnp.float32, *,
                      name: str | None = None, **kwargs: Any) -> "CLIPScorer":
    """Loads a CLIP model folder from local files only.

    Args:
      path: a folder as ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained``
        write it: ``config.json``; ``model.safetensors``, ``flax_model.msgpack``
        or ``pytorch_model.bin`` (the last needs torch); ``vocab.json`` and
        ``merges.txt`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``);
        ``preprocessor_config.json`` (without it: OpenAI's mean and std, resize
        and crop to the vision tower's ``image_size``).
      dtype: compute dtype of the transformers (weights stay float32).
      name: the name reports state (default: ``_name_or_path`` of
        ``config.json``, else the folder's name).
      **kwargs: passed to :class:`CLIPScorer` (``batch_size``, ``matmul_precision``).

    Raises:
      FileNotFoundError: the folder, its config, weights or tokenizer are missing
        (the one-line message says how to download the model).
    """
    # Imported here so that the rest of the package does not pay for transformers.
    # pylint: disable-next=g-import-not-at-top
    from transformers import CLIPImageProcessor, CLIPTokenizer, FlaxCLIPModel

    path = os.fspath(path)
    if not os.path.isdir(path):
      raise _missing(path, "no such folder")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
      raise _missing(path, "no config.json")
    weights = [pt for f, pt in _WEIGHTS if os.path.isfile(os.path.join(path, f))]
    if not weights:
      raise _missing(path, "no weights (" + ", ".join(f for f, _ in _WEIGHTS) + ")")
    for needed in _TOKENIZER_FILES:
      if not os.path.isfile(os.path.join(path, needed)):
        raise _missing(path, f"no tokenizer {needed}")

    model = FlaxCLIPModel.from_pretrained(path, dtype=dtype, from_pt=weights[0],
                                          local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
      preprocess = ImagePreprocess.from_processor(
          CLIPImageProcessor.from_pretrained(path, local_files_only=True))
    else:
      side = int(model.config.vision_config.image_size)
      preprocess = ImagePreprocess(resize=side, crop=(side, side))
    if name is None:
      with open(config_file) as f:
        name = json.load(f).get("_name_or_path") or ""
      name = name.rstrip("/")
      if not name or os.path.isabs(name):
        name = os.path.basename(os.path.normpath(path))
    return cls(model, tokenizer, preprocess, name=name, **kwargs)

  def _precision(self):
    return jax.default_matmul_precision(self.matmul_precision)

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, each ``[N, text_length]`` int32 (padded, truncated)."""
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not one string")
    batch = self.tokenizer(list(texts), padding="max_length", max_length=self.text_length,
                           truncation=True, return_tensors="np")
    return (np.asarray(batch["input_ids"], np.int32),
            np.asarray(batch["attention_mask"], np.int32))

  def image_embeddings(self, images: jax.Array | np.ndarray) -> jax.Array:
    """L2-normalised image embeddings (``get_image_features``).

    Args:
      images: ``[N, H, W, 3]`` float in ``[0, 1]`` (or uint8), any size: they
        are resized and cropped as the model's image processor does.

    Returns:
      ``[N, dim]`` float32, unit rows; computed ``batch_size`` images at a time.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [N, H, W, 3], got {images.shape}")
    with self._precision():
      out = [self._embed_images(self.params, jnp.asarray(images[i:i + self.batch_size]))
             for i in range(0, images.shape[0], self.batch_size)]
    return jnp.concatenate(out) if out else jnp.zeros((0, self.dim), jnp.float32)

  def text_embeddings(self, texts: Sequence[str]) -> jax.Array:
    """L2-normalised text embeddings (``get_text_features``).

    Args:
      texts: ``N`` prompts, tokenised with padding to ``text_length`` (77) and
        truncation.

    Returns:
      ``[N, dim]`` float32, unit rows.
    """
    ids, mask = self.tokenize(texts)
    with self._precision():
      out = [self._embed_texts(self.params, ids[i:i + self.batch_size],
                               mask[i:i + self.batch_size])
             for i in range(0, len(ids), self.batch_size)]
    return jnp.concatenate(out) if out else jnp.zeros((0, self.dim), jnp.float32)

  def image_similarities(self, renders: jax.Array | np.ndarray,
                         reference: jax.Array | np.ndarray) -> np.ndarray:
    """Per-view cosine similarity of the renders' and the reference's image embeddings.

    Args:
      renders: ``[V, H, W, 3]`` in ``[0, 1]``.
      reference: ``[H', W', 3]`` (or ``[1, H', W', 3]``), e.g. the input image.

    Returns:
      ``[V]`` float32 raw cosines in ``[-1, 1]`` (not x100, not clipped).
    """
    reference = reference.reshape((1,) + reference.shape[-3:])
    return _cosines(self.image_embeddings(renders), self.image_embeddings(reference)[0])

  def image_similarity(self, renders: jax.Array | np.ndarray,
                       reference: jax.Array | np.ndarray) -> float:
    """CLIP image similarity: the mean over the ``V`` renders of :meth:`image_similarities`.

    Args:
      renders: ``[V, H, W, 3]`` in ``[0, 1]``; which views, is the caller's choice.
      reference: ``[H', W', 3]``.

    Returns:
      The mean raw cosine (not x100, not clipped at 0).
    """
    return float(np.mean(self.image_similarities(renders, reference)))

  def text_similarities(self, renders: jax.Array | np.ndarray, text: str) -> np.ndarray:
    """Per-view cosine similarity of the renders' image embeddings and the text's.

    Args:
      renders: ``[V, H, W, 3]`` in ``[0, 1]``.
      text: the prompt or caption.

    Returns:
      ``[V]`` float32 raw cosines in ``[-1, 1]`` (not x100, not clipped).
    """
    return _cosines(self.image_embeddings(renders), self.text_embeddings([text])[0])

  def text_similarity(self, renders: jax.Array | np.ndarray, text: str) -> float:
    """CLIP text similarity: the mean over the ``V`` renders of :meth:`text_similarities`.

    Args:
      renders: ``[V, H, W, 3]`` in ``[0, 1]``; which views, is the caller's choice.
      text: the prompt or caption.

    Returns:
      The mean raw cosine (not x100, not clipped at 0).
    """
    return float(np.mean(self.text_similarities(renders, text)))
