"""diffusers ``AutoencoderKL`` checkpoints <-> vf3d_jax VAE parameters.

Reads ``vae/diffusion_pytorch_model.safetensors`` (or ``.bin``) of a
Stable-Diffusion-style model folder. The conversion is one table,
:data:`RULES`, built from three lists of layers (convolutions, GroupNorms,
attention projections) that name our path prefix and the checkpoint's key
prefix; the leaf rules are the same for every layer of a kind.

Two spellings of the mid-block attention occur in published files and both
load: the current ``to_q/to_k/to_v/to_out.0`` and the older
``query/key/value/proj_attn`` (renamed by :func:`canonical_state`). Files
converted from CompVis checkpoints may hold those projections as 1x1
convolutions ``(C, C, 1, 1)``; :data:`ATTENTION_LINEAR` accepts both shapes.
We always write the current spelling with ``(C, C)`` matrices.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np

from vf3d_jax.models.vae import VAEArch, param_shapes
from vf3d_jax.weights.rules import (CONV, Rule, RuleTable, SAME, Transform, key_indices, key_shape,
                                    params_from_state_dict, state_dict_from_params)
from vf3d_jax.weights.state_dict import CheckpointError, diffusers_weights_file, read_state_dict

_WHAT = "an AutoencoderKL checkpoint"  # how shape errors name the expected file


def _attention_weight_to_ours(x: np.ndarray) -> np.ndarray:
  if x.ndim == 4 and x.shape[2:] == (1, 1):  # a 1x1 conv (CompVis layout)
    x = x[:, :, 0, 0]
  return x.T


# PyTorch Linear (out, in), or a 1x1 Conv2d (out, in, 1, 1) -> our Dense kernel (in, out).
ATTENTION_LINEAR = Transform(_attention_weight_to_ours, lambda x: x.T)

_CODER = r"(?P<coder>encoder|decoder)"
_RESNET_PARENTS = (  # (our path, checkpoint key) of the modules holding resnets
    (_CODER + r"/(?P<dir>down|up)_blocks_(?P<block>\d+)", r"\g<coder>.\g<dir>_blocks.\g<block>"),
    (_CODER + r"/mid_block", r"\g<coder>.mid_block"),
)
_RESNET = r"/resnets_(?P<resnet>\d+)"
_RESNET_KEY = r".resnets.\g<resnet>"
_ATTN = _CODER + r"/mid_block/attentions_(?P<attn>\d+)"
_ATTN_KEY = r"\g<coder>.mid_block.attentions.\g<attn>"

# (our module path regex, checkpoint module key) per layer kind.
_CONVS = (
    (_CODER + r"/(?P<conv>conv_in|conv_out)", r"\g<coder>.\g<conv>"),
    (r"(?P<conv>quant_conv|post_quant_conv)", r"\g<conv>"),
    (r"encoder/down_blocks_(?P<block>\d+)/downsamplers_0/conv",
     r"encoder.down_blocks.\g<block>.downsamplers.0.conv"),
    (r"decoder/up_blocks_(?P<block>\d+)/upsamplers_0/conv",
     r"decoder.up_blocks.\g<block>.upsamplers.0.conv"),
) + tuple((p + _RESNET + r"/(?P<conv>conv1|conv2|conv_shortcut)", k + _RESNET_KEY + r".\g<conv>")
          for p, k in _RESNET_PARENTS)
_NORMS = (
    (_CODER + r"/conv_norm_out", r"\g<coder>.conv_norm_out"),
    (_ATTN + r"/group_norm", _ATTN_KEY + ".group_norm"),
) + tuple((p + _RESNET + r"/(?P<norm>norm1|norm2)", k + _RESNET_KEY + r".\g<norm>")
          for p, k in _RESNET_PARENTS)
_DENSES = (
    (_ATTN + r"/(?P<proj>to_q|to_k|to_v)", _ATTN_KEY + r".\g<proj>"),
    (_ATTN + r"/to_out_0", _ATTN_KEY + ".to_out.0"),
)

RULES: tuple[Rule, ...] = (
    tuple((p + "/kernel", k + ".weight", CONV) for p, k in _CONVS)
    + tuple((p + "/bias", k + ".bias", SAME) for p, k in _CONVS)
    + tuple((p + "/scale", k + ".weight", SAME) for p, k in _NORMS)
    + tuple((p + "/bias", k + ".bias", SAME) for p, k in _NORMS)
    + tuple((p + "/kernel", k + ".weight", ATTENTION_LINEAR) for p, k in _DENSES)
    + tuple((p + "/bias", k + ".bias", SAME) for p, k in _DENSES))
TABLE = RuleTable(RULES)
checkpoint_key = TABLE.checkpoint_key

# Older diffusers files (the original SD 1.5 upload among them) spell the mid attention so.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"((?:encoder|decoder)\.mid_block\.attentions\.\d+)\."
                         r"(query|key|value|proj_attn)\.(weight|bias)")


def canonical_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames legacy attention keys to the current spelling (other keys unchanged)."""
  out = {}
  for key, value in state.items():
    m = _LEGACY_KEY.fullmatch(key)
    if m:
      new = f"{m.group(1)}.{LEGACY_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
      if new in state:
        raise CheckpointError(f"checkpoint holds both {key} and {new}")
      key = new
    out[key] = value
  return out


def vae_from_state_dict(state: Mapping[str, np.ndarray], arch: VAEArch):
  """A diffusers AutoencoderKL state dict -> our parameter tree (float32 numpy), strictly.

  Every parameter of ``arch`` must be present with the right shape and every
  key must be used; otherwise a :class:`CheckpointError` names them all.
  """
  return params_from_state_dict(canonical_state(state), TABLE, param_shapes(arch),
                                what="VAE checkpoint")


def vae_to_state_dict(params) -> dict[str, np.ndarray]:
  """Our parameters -> a diffusers AutoencoderKL state dict (current key spelling, float32)."""
  return state_dict_from_params(params, TABLE)


def infer_vae_arch(state: Mapping[str, np.ndarray], **overrides) -> VAEArch:
  """Reads the architecture off a state dict's shapes.

  GroupNorm groups, the scaling factor and the shift are not visible in shapes:
  they default to SD 1.5's (32, 0.18215, None) unless given in ``overrides``.
  """
  state = canonical_state(state)
  levels = key_indices(state, "encoder.down_blocks")
  if not levels or levels != list(range(len(levels))):
    raise CheckpointError(f"not an AutoencoderKL checkpoint: encoder levels {levels}")
  chans = tuple(key_shape(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", _WHAT)[0]
                for i in levels)
  layers = len(key_indices(state, "encoder.down_blocks.0.resnets"))
  up_layers = len(key_indices(state, "decoder.up_blocks.0.resnets"))
  if up_layers != layers + 1:
    raise CheckpointError(f"decoder levels hold {up_layers} resnets; expected {layers + 1} "
                          f"(encoder levels hold {layers})")
  fields = dict(
      in_channels=key_shape(state, "encoder.conv_in.weight", _WHAT)[1],
      out_channels=key_shape(state, "decoder.conv_out.weight", _WHAT)[0],
      latent_channels=key_shape(state, "post_quant_conv.weight", _WHAT)[0],
      block_out_channels=chans, layers_per_block=layers)
  fields.update(overrides)
  try:
    return VAEArch(**fields)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"inconsistent VAE checkpoint: {e}") from None


# diffusers config.json entries that are VAEArch fields.
_CONFIG_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels",
                  "layers_per_block", "norm_num_groups", "scaling_factor", "shift_factor")


def _resolve(path: str) -> tuple[str, dict]:
  """A weights file and the diffusers config beside it (``{}`` when there is none)."""
  path = diffusers_weights_file(path, "vae")
  folder = os.path.dirname(path)
  config_path = os.path.join(folder, "config.json")
  if not os.path.exists(config_path):
    return path, {}
  with open(config_path) as f:
    config = json.load(f)
  if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise CheckpointError(f"{config_path}: not an AutoencoderKL config ({config['_class_name']})")
  unsupported = {k: config[k] for k in ("act_fn", "use_quant_conv", "use_post_quant_conv",
                                        "mid_block_add_attention")
                 if k in config and config[k] not in ("silu", True)}
  if unsupported:
    raise CheckpointError(f"{config_path}: unsupported AutoencoderKL options {unsupported}")
  return path, {k: config[k] for k in _CONFIG_FIELDS if k in config}


def load_vae(path: str | os.PathLike, arch: VAEArch | None = None):
  """Reads a diffusers AutoencoderKL: ``(arch, params)`` with numpy leaves.

  Args:
    path: a weights file (safetensors or PyTorch), a diffusers ``vae/``
      folder, or a pipeline folder holding ``vae/``.
    arch: the architecture; by default from ``config.json`` beside the weights
      where there is one, else inferred from the shapes (SD 1.5's groups and
      scaling factor).
  """
  path, config = _resolve(os.fspath(path))
  state = read_state_dict(path)
  try:
    if arch is None:
      arch = infer_vae_arch(state, **{k: config[k] for k in
                                      ("norm_num_groups", "scaling_factor", "shift_factor")
                                      if k in config})
      expected = {k: v for k, v in config.items() if k not in ("norm_num_groups", "scaling_factor",
                                                                "shift_factor")}
      got = {k: getattr(arch, k) for k in expected}
      if any(tuple(v) != got[k] if isinstance(v, list) else v != got[k]
             for k, v in expected.items()):
        raise CheckpointError(f"config.json says {expected}, the weights say {got}")
    return arch, vae_from_state_dict(state, arch)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
