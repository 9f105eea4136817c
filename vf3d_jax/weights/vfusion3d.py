"""The released VFusion3D checkpoint layout <-> vf3d_jax LRM parameters.

The conversion is one table, :data:`RULES` (see :mod:`vf3d_jax.weights.rules`):
a regular expression over our parameter paths (``/``-joined), the checkpoint key
it corresponds to, and the transform from the checkpoint's tensor layout to
ours. The same table converts back (:func:`to_state_dict`), so checkpoints
round-trip. Its DINOv2 rows come from :func:`dinov2_rules`, which also reads
transformers' ``Dinov2Model`` files (``vf3d_jax.engine.features.load_dinov2``).

The architecture is read off the checkpoint's shapes (:func:`infer_arch`), so
any checkpoint of this family loads; head counts are not visible in shapes and
default to ``width // 64`` (true for DINOv2 and VFusion3D).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Mapping

import jax
import numpy as np

from vf3d_jax.models.dinov2 import EncoderArch
from vf3d_jax.models.lrm import LRMArch, param_shapes
from vf3d_jax.weights.rules import (CONV, CONV_TRANSPOSE, LINEAR, Rule, RuleTable, SAME,
                                    key_indices, key_shape, params_from_state_dict,
                                    state_dict_from_params)
from vf3d_jax.weights.state_dict import (CheckpointError, read_safetensors_metadata,
                                         read_state_dict, write_safetensors)

# safetensors metadata entry holding the architecture as JSON (files we write).
ARCH_METADATA_KEY = "vf3d_jax.arch"

_ENC = "encoder.model"
_BLOCK = r"transformer/layers_(\d+)"


def dinov2_rules(key_prefix: str, path_prefix: str) -> tuple[Rule, ...]:
  """The rules of a DINOv2 encoder in transformers' ``Dinov2Model`` key layout.

  One source for every file holding such an encoder: the VFusion3D checkpoint
  (``dinov2_rules("encoder.model", "encoder")``, inside the LRM) and a
  ``Dinov2Model.save_pretrained`` folder (``dinov2_rules("", "")``, a
  standalone :class:`~vf3d_jax.models.dinov2.Dinov2Encoder`).

  Args:
    key_prefix: what the checkpoint keys start with (without the trailing dot);
      ``""`` for none.
    path_prefix: our parameter path of the encoder module (without the trailing
      ``/``); ``""`` for a standalone encoder.
  """
  k = f"{key_prefix}." if key_prefix else ""
  p = f"{re.escape(path_prefix)}/" if path_prefix else ""
  layer = p + r"layer_(\d+)"
  return (
      (p + r"embeddings/(cls_token|mask_token|position_embeddings)", k + r"embeddings.\1", SAME),
      (p + r"embeddings/patch_embeddings/projection/kernel",
       k + "embeddings.patch_embeddings.projection.weight", CONV),
      (p + r"embeddings/patch_embeddings/projection/bias",
       k + "embeddings.patch_embeddings.projection.bias", SAME),
      (layer + r"/(norm[12])/scale", k + r"encoder.layer.\1.\2.weight", SAME),
      (layer + r"/(norm[12])/bias", k + r"encoder.layer.\1.\2.bias", SAME),
      (layer + r"/attention/(query|key|value)/kernel",
       k + r"encoder.layer.\1.attention.attention.\2.weight", LINEAR),
      (layer + r"/attention/(query|key|value)/bias",
       k + r"encoder.layer.\1.attention.attention.\2.bias", SAME),
      (layer + r"/attention/output/kernel", k + r"encoder.layer.\1.attention.output.dense.weight",
       LINEAR),
      (layer + r"/attention/output/bias", k + r"encoder.layer.\1.attention.output.dense.bias",
       SAME),
      (layer + r"/(layer_scale[12])", k + r"encoder.layer.\1.\2.lambda1", SAME),
      (layer + r"/(fc[12])/kernel", k + r"encoder.layer.\1.mlp.\2.weight", LINEAR),
      (layer + r"/(fc[12])/bias", k + r"encoder.layer.\1.mlp.\2.bias", SAME),
      (p + r"layernorm/scale", k + "layernorm.weight", SAME),
      (p + r"layernorm/bias", k + "layernorm.bias", SAME),
  )


# (our parameter path, checkpoint key, transform). Paths are full-match regexes;
# keys use their groups.
RULES: tuple[Rule, ...] = (
    # DINOv2 encoder.
    *dinov2_rules(_ENC, "encoder"),
    # Camera embedder.
    (r"camera_embedder/mlp_(\d)/kernel", r"camera_embedder.mlp.\1.weight", LINEAR),
    (r"camera_embedder/mlp_(\d)/bias", r"camera_embedder.mlp.\1.bias", SAME),
    # Triplane transformer.
    (r"transformer/pos_embed", "transformer.pos_embed", SAME),
    (_BLOCK + r"/(norm[123])/norm/scale", r"transformer.layers.\1.\2.norm.weight", SAME),
    (_BLOCK + r"/(norm[123])/norm/bias", r"transformer.layers.\1.\2.norm.bias", SAME),
    (_BLOCK + r"/(norm[123])/mlp_1/kernel", r"transformer.layers.\1.\2.mlp.1.weight", LINEAR),
    (_BLOCK + r"/(norm[123])/mlp_1/bias", r"transformer.layers.\1.\2.mlp.1.bias", SAME),
    (_BLOCK + r"/cross_attn/([qkv])_proj/kernel", r"transformer.layers.\1.cross_attn.\2_proj_weight",
     LINEAR),
    (_BLOCK + r"/cross_attn/out_proj/kernel", r"transformer.layers.\1.cross_attn.out_proj.weight",
     LINEAR),
    (_BLOCK + r"/self_attn/in_proj/kernel", r"transformer.layers.\1.self_attn.in_proj_weight", LINEAR),
    (_BLOCK + r"/self_attn/out_proj/kernel", r"transformer.layers.\1.self_attn.out_proj.weight",
     LINEAR),
    (_BLOCK + r"/mlp_([03])/kernel", r"transformer.layers.\1.mlp.\2.weight", LINEAR),
    (_BLOCK + r"/mlp_([03])/bias", r"transformer.layers.\1.mlp.\2.bias", SAME),
    (r"transformer/norm/(scale)", "transformer.norm.weight", SAME),
    (r"transformer/norm/(bias)", "transformer.norm.bias", SAME),
    (r"transformer/deconv/kernel", "transformer.deconv.weight", CONV_TRANSPOSE),
    (r"transformer/deconv/bias", "transformer.deconv.bias", SAME),
    # Triplane field decoder.
    (r"synthesizer/decoder/net_(\d+)/kernel", r"synthesizer.decoder.net.\1.weight", LINEAR),
    (r"synthesizer/decoder/net_(\d+)/bias", r"synthesizer.decoder.net.\1.bias", SAME),
)
TABLE = RuleTable(RULES)
checkpoint_key = TABLE.checkpoint_key

_WHAT = "a VFusion3D checkpoint"  # how shape errors name the expected file


def infer_arch(state: Mapping[str, np.ndarray], *, encoder_heads: int | None = None,
               heads: int | None = None, input_size: int = 512,
               pos_resize: str = "legacy") -> LRMArch:
  """Reads the architecture off a checkpoint's tensor shapes."""
  enc_width = key_shape(state, f"{_ENC}.embeddings.cls_token", _WHAT)[-1]
  patch = key_shape(state, f"{_ENC}.embeddings.patch_embeddings.projection.weight", _WHAT)[-1]
  pos_tokens = key_shape(state, f"{_ENC}.embeddings.position_embeddings", _WHAT)[1] - 1
  enc_layers = key_indices(state, f"{_ENC}.encoder.layer")
  if not enc_layers:
    raise CheckpointError("not a VFusion3D checkpoint: no encoder layers")
  enc_mlp = key_shape(state, f"{_ENC}.encoder.layer.0.mlp.fc1.weight", _WHAT)[0]
  cam_embed, cam_dim = key_shape(state, "camera_embedder.mlp.0.weight", _WHAT)
  _, tokens, width = key_shape(state, "transformer.pos_embed", _WHAT)
  blocks = key_indices(state, "transformer.layers")
  if not blocks:
    raise CheckpointError("not a VFusion3D checkpoint: no transformer layers")
  mlp_dim = key_shape(state, "transformer.layers.0.mlp.0.weight", _WHAT)[0]
  channels = key_shape(state, "transformer.deconv.weight", _WHAT)[1]
  net = key_indices(state, "synthesizer.decoder.net")
  if not net:
    raise CheckpointError("not a VFusion3D checkpoint: no decoder layers")
  hidden = key_shape(state, "synthesizer.decoder.net.0.weight", _WHAT)[0]
  res = int(round((tokens // 3) ** 0.5))
  grid = int(round(pos_tokens ** 0.5))
  if 3 * res * res != tokens or grid * grid != pos_tokens:
    raise CheckpointError(f"position tables of unexpected size ({tokens}, {pos_tokens + 1})")
  try:
    return LRMArch(
        encoder=EncoderArch(width=enc_width, depth=len(enc_layers),
                            heads=encoder_heads or max(enc_width // 64, 1), mlp_dim=enc_mlp,
                            patch_size=patch, pos_grid=grid, pos_resize=pos_resize),
        camera_dim=cam_dim, camera_embed_dim=cam_embed, width=width, layers=len(blocks),
        heads=heads or max(width // 64, 1), mlp_dim=mlp_dim, triplane_res=res,
        triplane_channels=channels, decoder_hidden=hidden, decoder_layers=len(net),
        input_size=input_size)
  except ValueError as e:
    raise CheckpointError(f"inconsistent checkpoint: {e}") from None


def from_state_dict(state: Mapping[str, np.ndarray], arch: LRMArch):
  """Converts a checkpoint state dict to our parameter tree, strictly.

  Every parameter of ``arch`` must be present with the right shape and every
  checkpoint key must be used; otherwise a :class:`CheckpointError` lists them.
  """
  return params_from_state_dict(state, TABLE, param_shapes(arch))


def to_state_dict(params) -> dict[str, np.ndarray]:
  """Our parameters -> a state dict in the released layout (float32 numpy)."""
  return state_dict_from_params(params, TABLE)


def arch_from_json(text: str | bytes, source: str) -> LRMArch:
  """The ``LRMArch`` a JSON text describes (an ``arch.json``, or our safetensors metadata).

  Raises:
    CheckpointError: not JSON, unknown fields, or values ``LRMArch`` rejects;
      the message starts with ``source``.
  """
  try:
    fields = json.loads(text)
  except ValueError as e:
    raise CheckpointError(f"{source}: not valid JSON ({e})") from None
  if not isinstance(fields, dict) or not isinstance(fields.get("encoder", {}), dict):
    raise CheckpointError(f"{source}: expected a JSON object of architecture fields")
  unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(LRMArch)}) + sorted(
      f"encoder.{k}" for k in set(fields.get("encoder", {})) - {
          f.name for f in dataclasses.fields(EncoderArch)})
  if unknown:
    raise CheckpointError(f"{source}: unknown architecture fields: {', '.join(unknown)}")
  try:
    return LRMArch.from_dict(fields)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{source}: bad architecture ({' '.join(str(e).split())})") from None


def save_checkpoint_file(path, arch: LRMArch, params) -> None:
  """Writes ``params`` as safetensors in the released layout, with ``arch`` as metadata."""
  write_safetensors(to_state_dict(params), path,
                    metadata={ARCH_METADATA_KEY: json.dumps(arch.to_dict())})


def load_checkpoint_file(path, **arch_overrides):
  """Reads a released-layout checkpoint: ``(arch, params)`` (numpy leaves).

  The architecture comes from the file's metadata when we wrote it, else it is
  inferred from the shapes; ``arch_overrides`` (see :func:`infer_arch`) win.
  """
  state = read_state_dict(path)
  stored = read_safetensors_metadata(path).get(ARCH_METADATA_KEY)
  if stored:
    arch = arch_from_json(stored, f"{path}: metadata {ARCH_METADATA_KEY!r}")
    if arch_overrides:
      enc = {"heads": arch_overrides.pop("encoder_heads", arch.encoder.heads),
             "pos_resize": arch_overrides.pop("pos_resize", arch.encoder.pos_resize)}
      arch = dataclasses.replace(arch, encoder=dataclasses.replace(arch.encoder, **enc),
                                 **arch_overrides)
  else:
    arch = infer_arch(state, **arch_overrides)
  try:
    return arch, from_state_dict(state, arch)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None


def to_device(params):
  return jax.tree.map(jax.numpy.asarray, params)
