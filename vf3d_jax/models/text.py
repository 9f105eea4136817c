"""Text encoders for the video diffusion model: prompts -> token embeddings.

Every encoder has the same small interface (:class:`TextEncoder`), used by
training and sampling alike::

  tokens = encoder.tokenize(["a red chair", ""])   # [N, max_length] int32 (numpy)
  params = encoder.init(rng)
  context = encoder.apply(params, tokens)          # [N, max_length, width] float32

Two implementations:

* :class:`CLIPText`: Stable Diffusion 1.5's CLIP ViT-L/14 text tower, read from
  a local model folder (``text_encoder/`` + ``tokenizer/``) with transformers'
  ``FlaxCLIPTextModel`` and ``CLIPTokenizer``; PyTorch safetensors load
  without torch. The embedding is ``last_hidden_state`` (after the final
  LayerNorm), over all 77 positions, as SD 1.5's pipeline uses it.
* :class:`WordText`: a small trainable encoder over hashed words for offline
  experiments on procedural captions.

Classifier-free guidance uses the encoding of the empty prompt as the
unconditional context (:func:`null_tokens`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from typing import Any, Protocol, Sequence, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax.models import layers


@runtime_checkable
class TextEncoder(Protocol):
  """Prompts -> ``[N, max_length, width]`` context for cross-attention."""

  max_length: int  # tokens per prompt (padded / truncated)
  width: int  # embedding width

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """``[N, max_length]`` int32 token ids (host-side, deterministic)."""

  def apply(self, params, tokens: jax.Array) -> jax.Array:
    """``[N, max_length]`` ids -> ``[N, max_length, width]`` float32 (pure, jittable)."""

  def init(self, rng: jax.Array) -> Any:
    """The encoder's parameters (pretrained encoders return their weights)."""


def null_tokens(encoder: TextEncoder, n: int = 1) -> np.ndarray:
  """Tokens of the empty prompt, ``[n, max_length]``: the unconditional input for guidance."""
  return encoder.tokenize([""] * n)


def encode_prompts(encoder: TextEncoder, params, prompts: Sequence[str]) -> jax.Array:
  """``tokenize`` then ``apply``: ``[N, max_length, width]`` float32."""
  return encoder.apply(params, jnp.asarray(encoder.tokenize(prompts)))


# ----------------------------------------------------------------------------- CLIP


class CLIPText:
  """The CLIP text tower of an SD-1.5-style model folder (transformers Flax)."""

  def __init__(self, model, tokenizer, max_length: int | None = None):
    """Wraps a ``FlaxCLIPTextModel`` and its ``CLIPTokenizer``.

    ``max_length`` defaults to the smaller of the tokenizer's
    ``model_max_length`` and the model's position table (77 for SD 1.5).
    """
    self._model = model
    self.tokenizer = tokenizer
    limit = model.config.max_position_embeddings
    self.max_length = int(max_length or min(tokenizer.model_max_length, limit))
    if self.max_length > limit:
      raise ValueError(f"max_length {self.max_length} exceeds the {limit} position embeddings")
    self.width = int(model.config.hidden_size)
    self.params = model.params

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *,
                      tokenizer_path: str | os.PathLike | None = None,
                      dtype: jnp.dtype = jnp.float32) -> "CLIPText":
    """Loads from local files only (no network, no torch).

    Args:
      path: a model folder holding ``text_encoder/`` (``config.json`` and
        ``model.safetensors`` or ``flax_model.msgpack``) and ``tokenizer/``
        (``vocab.json``, ``merges.txt``); or the text-encoder folder itself.
      tokenizer_path: the tokenizer folder when ``path`` is the text-encoder
        folder (default: ``path/tokenizer``, else ``path``).
      dtype: compute dtype of the transformer (weights stay float32).
    """
    # Imported here so that the rest of the package does not pay for transformers.
    from transformers import CLIPTokenizer, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    encoder_dir = os.path.join(path, "text_encoder")
    if not os.path.isdir(encoder_dir):
      encoder_dir = path
    if tokenizer_path is None:
      tokenizer_path = os.path.join(path, "tokenizer")
      if not os.path.isdir(tokenizer_path):
        tokenizer_path = path
    tokenizer_path = os.fspath(tokenizer_path)
    for folder, needed in ((encoder_dir, "config.json"), (tokenizer_path, "vocab.json"),
                           (tokenizer_path, "merges.txt")):
      if not os.path.isfile(os.path.join(folder, needed)):
        raise FileNotFoundError(f"{folder}: no {needed} (expected an SD-style text_encoder/ and "
                                "tokenizer/ folder)")
    model = FlaxCLIPTextModel.from_pretrained(encoder_dir, dtype=dtype, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    return cls(model, tokenizer)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """``[N, max_length]`` int32: ``<start> tokens <end> <pad>...``, truncated to ``max_length``."""
    batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                           truncation=True, return_tensors="np")
    return np.asarray(batch["input_ids"], np.int32)

  def apply(self, params, tokens: jax.Array) -> jax.Array:
    """``[N, L]`` ids -> ``last_hidden_state`` ``[N, L, width]`` float32.

    No padding mask, as SD 1.5 (its config has no ``use_attention_mask``): the
    causal mask alone keeps positions from seeing later padding.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
    out = self._model.module.apply({"params": params}, tokens, jnp.ones_like(tokens), positions,
                                   deterministic=True)
    return out.last_hidden_state.astype(jnp.float32)

  def init(self, rng: jax.Array):
    """The pretrained weights (``rng`` is unused: this encoder is not trained from scratch)."""
    del rng
    return self.params


# ------------------------------------------------------------------------ WordText

PAD_ID = 0  # padding after the last word
START_ID = 1  # first token of every prompt, so the empty prompt has one real token
FIRST_WORD_ID = 2  # word ids are FIRST_WORD_ID + crc32(word) % (vocab_size - FIRST_WORD_ID)
_WORD = re.compile(r"[a-z0-9]+")


def word_ids(prompt: str, vocab_size: int) -> list[int]:
  """Lower-cased alphanumeric words -> ids by CRC-32 (stable across processes and machines)."""
  buckets = vocab_size - FIRST_WORD_ID
  return [FIRST_WORD_ID + zlib.crc32(w.encode("utf-8")) % buckets
          for w in _WORD.findall(prompt.lower())]


class WordTextEncoder(nn.Module):
  """Token + position tables, one pre-LN transformer layer, a final LayerNorm."""

  vocab_size: int  # token ids in [0, vocab_size)
  max_length: int  # positions
  width: int  # embedding width
  heads: int  # attention heads
  mlp_dim: int  # hidden width of the MLP
  dtype: jnp.dtype = jnp.float32  # compute dtype

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """``[N, L]`` int ids (``L <= max_length``) -> ``[N, L, width]`` float32."""
    n, length = tokens.shape
    embed = nn.Embed(self.vocab_size, self.width, param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(0.02), name="token_embedding")
    positions = self.param("position_embedding", nn.initializers.normal(0.01),
                           (self.max_length, self.width))
    x = embed(tokens) + positions[:length]
    # Keys at padding are masked; START_ID is never padding, so no row is empty.
    mask = (tokens != PAD_ID)[:, None, None, :]
    h = layers.layer_norm(1e-5, self.dtype, "ln_1")(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=layers.torch_linear_init, deterministic=True, name="attn")(h, h, mask=mask)
    h = layers.layer_norm(1e-5, self.dtype, "ln_2")(x)
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                                            kernel_init=layers.torch_linear_init, name=name)
    x = x + dense(self.width, "fc2")(layers.gelu(dense(self.mlp_dim, "fc1")(h)))
    return layers.layer_norm(1e-5, self.dtype, "final_norm")(x).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class WordText:
  """A tiny trainable text encoder over hashed words (for offline experiments)."""

  vocab_size: int = 4096  # hashed-word vocabulary, including PAD_ID and START_ID
  max_length: int = 16  # tokens per prompt: START_ID + up to max_length - 1 words
  width: int = 128  # embedding width
  heads: int = 4  # attention heads
  mlp_dim: int = 512  # hidden width of the MLP
  dtype: Any = jnp.float32  # compute dtype

  def __post_init__(self):
    if self.vocab_size <= FIRST_WORD_ID:
      raise ValueError(f"vocab_size must exceed {FIRST_WORD_ID}, got {self.vocab_size}")
    if self.max_length < 1:
      raise ValueError(f"max_length must be positive, got {self.max_length}")
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")

  @property
  def module(self) -> WordTextEncoder:
    return WordTextEncoder(self.vocab_size, self.max_length, self.width, self.heads, self.mlp_dim,
                           self.dtype)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """``[N, max_length]`` int32: ``START_ID``, word ids, then ``PAD_ID``; extra words dropped."""
    out = np.full((len(prompts), self.max_length), PAD_ID, np.int32)
    for i, prompt in enumerate(prompts):
      ids = [START_ID] + word_ids(prompt, self.vocab_size)
      ids = ids[:self.max_length]
      out[i, :len(ids)] = ids
    return out

  def apply(self, params, tokens: jax.Array) -> jax.Array:
    return self.module.apply({"params": params}, jnp.asarray(tokens, jnp.int32))

  def init(self, rng: jax.Array):
    """Random float32 parameters (jitted: initialising op by op is slow)."""
    tokens = jnp.zeros((1, self.max_length), jnp.int32)
    return jax.jit(lambda r: self.module.init(r, tokens)["params"])(rng)
