"""Stable Diffusion UNet and AnimateDiff motion-module checkpoints <-> vf3d_jax UNet parameters.

Layouts read:

* the diffusers UNet (``unet/diffusion_pytorch_model.safetensors`` of a
  Stable Diffusion 1.5 repository): ``conv_in.weight``,
  ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``, ...;
* diffusers ``MotionAdapter`` files: ``down_blocks.0.motion_modules.0.norm.weight``,
  ``mid_block.motion_modules.0.transformer_blocks.0.attn1.to_q.weight``, ...;
* the original AnimateDiff motion modules (``mm_sd_v15_v2.ckpt``), renamed
  onto the ``MotionAdapter`` layout by :func:`motion_state_from_original`.

Adapter parameters with no published layout (``temporal_conv*``,
``conv_in_cond``) are written and read under diffusers-style names
(``down_blocks.0.resnets.1.temporal_conv2.conv.weight``, ``conv_in_cond.weight``),
so fine-tuned video models round-trip through :func:`unet_to_state_dict`.

The conversion is one table, :data:`RULES`: block-local rules combined with
the block prefixes (``down_blocks_i``, ``mid_block``, ``up_blocks_i``), plus the
top-level layers; see :mod:`vf3d_jax.weights.rules`.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

import jax
import numpy as np

from vf3d_jax.models import unet as unet_lib
from vf3d_jax.models.unet import UNetArch
from vf3d_jax.weights.rules import (CONV, LINEAR, Rule, RuleTable, SAME, Transform, flat,
                                    key_indices, key_shape, params_from_state_dict,
                                    state_dict_from_params, unflat)
from vf3d_jax.weights.state_dict import CheckpointError, read_state_dict

# PyTorch Conv1d.weight (out, in, k) <-> ours (k, in, out).
CONV1D = Transform(lambda x: x.transpose(2, 1, 0), lambda x: x.transpose(2, 1, 0))
# Transformer proj_in/proj_out: a 1x1 Conv2d (SD1.5) or a Linear (SD2, motion
# modules), recognised by rank. A checkpoint of the other kind then fails the
# shape check, naming the key.
PROJECTION = Transform(
    lambda x: CONV.load(x) if x.ndim == 4 else LINEAR.load(x),
    lambda x: CONV.save(x) if x.ndim == 4 else LINEAR.save(x))

# Fixed sinusoid tables stored as buffers: recomputed, never loaded.
POSITION_BUFFERS = (r".*\.pos_embed\.pe", r".*\.pos_encoder\.pe")

_TRANSFORMER = r"(?P<kind>attentions|motion_modules)_(?P<j>\d+)"
_TRANSFORMER_KEY = r"\g<kind>.\g<j>"
_TBLOCK = _TRANSFORMER + r"/transformer_blocks_(?P<t>\d+)"
_TBLOCK_KEY = _TRANSFORMER_KEY + r".transformer_blocks.\g<t>"
_RESNET = r"resnets_(?P<r>\d+)"
_RESNET_KEY = r"resnets.\g<r>"

# Rules inside a block: (path below the block, key below the block, transform).
_BLOCK_RULES: tuple[Rule, ...] = (
    (_RESNET + r"/(?P<m>norm[12])/scale", _RESNET_KEY + r".\g<m>.weight", SAME),
    (_RESNET + r"/(?P<m>norm[12]|conv[12]|conv_shortcut|time_emb_proj)/bias",
     _RESNET_KEY + r".\g<m>.bias", SAME),
    (_RESNET + r"/(?P<m>conv[12]|conv_shortcut)/kernel", _RESNET_KEY + r".\g<m>.weight", CONV),
    (_RESNET + r"/time_emb_proj/kernel", _RESNET_KEY + ".time_emb_proj.weight", LINEAR),
    (_RESNET + r"/(?P<m>temporal_conv[12])/norm/scale", _RESNET_KEY + r".\g<m>.norm.weight", SAME),
    (_RESNET + r"/(?P<m>temporal_conv[12])/(?P<p>norm|conv)/bias",
     _RESNET_KEY + r".\g<m>.\g<p>.bias", SAME),
    (_RESNET + r"/(?P<m>temporal_conv[12])/conv/kernel", _RESNET_KEY + r".\g<m>.conv.weight",
     CONV1D),
    (_TRANSFORMER + r"/norm/scale", _TRANSFORMER_KEY + ".norm.weight", SAME),
    (_TRANSFORMER + r"/(?P<m>norm|proj_in|proj_out)/bias", _TRANSFORMER_KEY + r".\g<m>.bias", SAME),
    (_TRANSFORMER + r"/(?P<m>proj_in|proj_out)/kernel", _TRANSFORMER_KEY + r".\g<m>.weight",
     PROJECTION),
    (_TBLOCK + r"/(?P<m>norm[123])/scale", _TBLOCK_KEY + r".\g<m>.weight", SAME),
    (_TBLOCK + r"/(?P<m>norm[123])/bias", _TBLOCK_KEY + r".\g<m>.bias", SAME),
    (_TBLOCK + r"/(?P<a>attn[12])/(?P<p>to_q|to_k|to_v)/kernel",
     _TBLOCK_KEY + r".\g<a>.\g<p>.weight", LINEAR),
    (_TBLOCK + r"/(?P<a>attn[12])/to_out_0/kernel", _TBLOCK_KEY + r".\g<a>.to_out.0.weight",
     LINEAR),
    (_TBLOCK + r"/(?P<a>attn[12])/to_out_0/bias", _TBLOCK_KEY + r".\g<a>.to_out.0.bias", SAME),
    (_TBLOCK + r"/ff/net_0/proj/kernel", _TBLOCK_KEY + ".ff.net.0.proj.weight", LINEAR),
    (_TBLOCK + r"/ff/net_0/proj/bias", _TBLOCK_KEY + ".ff.net.0.proj.bias", SAME),
    (_TBLOCK + r"/ff/net_2/kernel", _TBLOCK_KEY + ".ff.net.2.weight", LINEAR),
    (_TBLOCK + r"/ff/net_2/bias", _TBLOCK_KEY + ".ff.net.2.bias", SAME),
    (r"(?P<s>downsamplers|upsamplers)_0/conv/kernel", r"\g<s>.0.conv.weight", CONV),
    (r"(?P<s>downsamplers|upsamplers)_0/conv/bias", r"\g<s>.0.conv.bias", SAME),
)
# Block prefixes: (path regex, key).
_BLOCKS = ((r"(?P<blk>down_blocks|up_blocks)_(?P<b>\d+)", r"\g<blk>.\g<b>"),
           (r"(?P<blk>mid_block)", r"\g<blk>"))

RULES: tuple[Rule, ...] = (
    (r"(?P<m>conv_in|conv_out|conv_in_cond)/kernel", r"\g<m>.weight", CONV),
    (r"(?P<m>conv_in|conv_out)/bias", r"\g<m>.bias", SAME),
    (r"time_embedding/(?P<m>linear_[12])/kernel", r"time_embedding.\g<m>.weight", LINEAR),
    (r"time_embedding/(?P<m>linear_[12])/bias", r"time_embedding.\g<m>.bias", SAME),
    (r"conv_norm_out/scale", "conv_norm_out.weight", SAME),
    (r"conv_norm_out/bias", "conv_norm_out.bias", SAME),
) + tuple((block + "/" + path, block_key + "." + key, transform)
          for block, block_key in _BLOCKS for path, key, transform in _BLOCK_RULES)
TABLE = RuleTable(RULES)
checkpoint_key = TABLE.checkpoint_key

# Checkpoint keys of adapter tensors (the same words as our paths).
_ADAPTER_KEY = re.compile(unet_lib.ADAPTER_PATTERN)
# Adapter groups: a checkpoint holding any tensor of a group must hold all of it.
_ADAPTER_GROUPS = ("motion_modules", "temporal_conv", "conv_in_cond")

# Original AnimateDiff names -> MotionAdapter names (applied in order).
_ORIGINAL_MOTION_RENAMES = (
    (r"\.motion_modules\.(\d+)\.temporal_transformer\.", r".motion_modules.\1."),
    (r"\.attention_blocks\.0\.", ".attn1."),
    (r"\.attention_blocks\.1\.", ".attn2."),
    (r"\.norms\.0\.", ".norm1."),
    (r"\.norms\.1\.", ".norm2."),
    (r"\.ff_norm\.", ".norm3."),
)

_WHAT = "a diffusers UNet checkpoint"  # how shape errors name the expected file


def motion_state_from_original(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames an original AnimateDiff motion-module state dict to the ``MotionAdapter`` layout.

  ``X.motion_modules.J.temporal_transformer.R`` -> ``X.motion_modules.J.R``;
  inside ``R``: ``attention_blocks.{0,1}`` -> ``attn{1,2}``, ``norms.{0,1}`` ->
  ``norm{1,2}``, ``ff_norm`` -> ``norm3``. The ``attention_blocks.K.pos_encoder.pe``
  buffers (the same sinusoid table diffusers adds before each attention) are
  dropped. Keys already in the ``MotionAdapter`` layout pass unchanged.
  """
  out = {}
  for key, value in state.items():
    if re.fullmatch(POSITION_BUFFERS[1], key):
      continue
    new = key
    for pattern, replacement in _ORIGINAL_MOTION_RENAMES:
      new = re.sub(pattern, replacement, new)
    if new in out:
      raise CheckpointError(f"motion checkpoint has {key} in two layouts")
    out[new] = value
  return out


def _subtree(shapes: Mapping[str, object], select) -> dict:
  return unflat({p: s for p, s in shapes.items() if select(p)})


@functools.lru_cache(maxsize=8)
def _shapes(arch: UNetArch) -> tuple[tuple[str, jax.ShapeDtypeStruct], ...]:
  # Tracing the model takes seconds at full size; architectures are hashable.
  return tuple(flat(unet_lib.param_shapes(arch)).items())


def _flat_shapes(arch: UNetArch) -> dict[str, jax.ShapeDtypeStruct]:
  return dict(_shapes(arch))


def image_params_from_state_dict(state: Mapping[str, np.ndarray], arch: UNetArch):
  """The image model's parameters (everything but adapters) from a diffusers UNet state dict.

  Strict: every image parameter of ``arch`` present with the right shape, every
  key used. Returns a nested dict of float32 numpy arrays.
  """
  shapes = _flat_shapes(arch)
  image = _subtree(shapes, lambda p: not unet_lib.is_adapter(p))
  return params_from_state_dict(state, TABLE, image, what="UNet checkpoint")


def motion_params_from_state_dict(state: Mapping[str, np.ndarray], arch: UNetArch):
  """The ``motion_modules`` parameters from a motion-module state dict (either layout).

  Strict over every motion-module parameter of ``arch`` (which must have
  ``motion_modules``); sinusoid buffers are ignored.
  """
  if not arch.motion_modules:
    raise ValueError("arch has no motion modules")
  shapes = _flat_shapes(arch)
  return params_from_state_dict(motion_state_from_original(state), TABLE,
                                _subtree(shapes, lambda p: "motion_modules" in p),
                                ignore=POSITION_BUFFERS, what="motion-module checkpoint")


def merge_params(base, *partials):
  """``base`` with leaves replaced by those of ``partials``.

  Strict: every partial leaf must exist in ``base`` with the same shape, and no
  leaf may come from two partials.

  Raises:
    CheckpointError: naming the offending leaves.
  """
  merged = flat(base)
  source: dict[str, int] = {}
  twice, extra, wrong = [], [], []
  for i, partial in enumerate(partials):
    for path, value in flat(partial).items():
      if path not in merged:
        extra.append(path)
      elif path in source:
        twice.append(path)
      elif tuple(np.shape(value)) != tuple(merged[path].shape):
        wrong.append(f"{path} {tuple(np.shape(value))} (expected {tuple(merged[path].shape)})")
      else:
        merged[path] = value
        source[path] = i
  problems = [f"{name}: {', '.join(sorted(paths)[:6])}" + (f" ... ({len(paths)} in all)"
                                                          if len(paths) > 6 else "")
              for name, paths in (("not in the model", extra), ("given twice", twice),
                                  ("wrong shape", wrong)) if paths]
  if problems:
    raise CheckpointError("cannot merge parameters; " + "; ".join(problems))
  return unflat(merged)


def unet_from_state_dict(state: Mapping[str, np.ndarray], arch: UNetArch, *,
                         motion_state: Mapping[str, np.ndarray] | None = None,
                         adapters: str = "init", init_rng: jax.Array | None = None):
  """Full UNet parameters: image weights from ``state``, adapters from checkpoints or fresh.

  Args:
    state: a diffusers-layout UNet state dict; it may also hold adapter tensors
      (a video UNet written by :func:`unet_to_state_dict`).
    arch: the model to build.
    motion_state: motion modules (``MotionAdapter`` or original AnimateDiff
      layout); the same tensor may not also be in ``state``.
    adapters: ``"require"``: every adapter parameter must come from a state
      dict; ``"init"``: adapter groups (motion modules, temporal convs,
      conditioning conv) absent from both are freshly initialised (identity).
      A group present in part is an error either way.
    init_rng: key for fresh adapters (default ``jax.random.key(0)``).

  Returns:
    A nested dict of float32 leaves (numpy, or jax arrays for fresh adapters).
  """
  if adapters not in ("init", "require"):
    raise ValueError(f"adapters must be 'init' or 'require', got {adapters!r}")
  shapes = _flat_shapes(arch)
  image_state = {k: v for k, v in state.items() if not _ADAPTER_KEY.fullmatch(k)}
  sources = {k: v for k, v in state.items() if _ADAPTER_KEY.fullmatch(k)}
  if motion_state is not None:
    motion = motion_state_from_original(motion_state)
    both = sorted(set(motion) & set(sources))
    if both:
      raise CheckpointError(f"adapter tensors given twice (UNet and motion checkpoints): "
                            f"{', '.join(both[:6])}")
    sources.update(motion)
  image = params_from_state_dict(image_state, TABLE,
                                 _subtree(shapes, lambda p: not unet_lib.is_adapter(p)),
                                 what="UNet checkpoint")

  adapter_paths = [p for p in shapes if unet_lib.is_adapter(p)]
  group_of = lambda p: next(g for g in _ADAPTER_GROUPS if g in p)
  present = {group_of(p) for p in adapter_paths if TABLE.checkpoint_key(p)[0] in sources}
  load = [p for p in adapter_paths if adapters == "require" or group_of(p) in present]
  loaded = params_from_state_dict(sources, TABLE, _subtree(shapes, set(load).__contains__),
                                  ignore=POSITION_BUFFERS, what="adapter checkpoint")
  fresh = {}
  if len(load) < len(adapter_paths):
    rng = jax.random.key(0) if init_rng is None else init_rng
    wanted = set(adapter_paths) - set(load)
    fresh = unflat({p: v for p, v in flat(unet_lib.init_adapter_params(arch, rng)).items()
                    if p in wanted})
  params = merge_params(unflat(shapes), image, loaded, fresh)
  assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  return params


def unet_to_state_dict(params) -> dict[str, np.ndarray]:
  """All parameters (image and adapters) -> a diffusers-layout state dict (float32 numpy)."""
  return state_dict_from_params(params, TABLE)


def motion_to_state_dict(params) -> dict[str, np.ndarray]:
  """The motion modules only -> a ``MotionAdapter``-layout state dict (float32 numpy)."""
  motion = unflat({p: v for p, v in flat(params).items() if "motion_modules" in p})
  if not motion:
    raise ValueError("parameters hold no motion modules")
  return state_dict_from_params(motion, TABLE)


def infer_unet_arch(state: Mapping[str, np.ndarray], **overrides) -> UNetArch:
  """Reads a UNet's architecture off a diffusers-layout state dict's shapes.

  Read from shapes: in/out channels, block widths, layers per block, which
  levels have attention, the context width, linear vs 1x1-conv projections,
  and which adapters the state holds (motion modules, mid-block motion module,
  temporal convs, conditioning channels). Not visible in shapes, so Stable
  Diffusion 1.5's values unless overridden: ``attention_heads``,
  ``norm_num_groups``, ``norm_eps``, ``motion_heads``, ``motion_max_frames``,
  the timestep embedding options.
  """
  if any(k.startswith("model.diffusion_model.") for k in state):
    raise CheckpointError("this is the original Stable Diffusion (LDM) layout; convert it to the "
                          "diffusers layout first (diffusers' single-file loader does)")
  levels = key_indices(state, "down_blocks")
  if not levels or levels != list(range(len(levels))):
    raise CheckpointError(f"not a diffusers UNet checkpoint: down_blocks {levels}")
  channels = tuple(key_shape(state, f"down_blocks.{i}.resnets.0.conv1.weight", _WHAT)[0]
                   for i in levels)
  layers = key_indices(state, "down_blocks.0.resnets")
  attention = tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in state for i in levels)
  mid = "mid_block.attentions.0"
  cross = key_shape(state, f"{mid}.transformer_blocks.0.attn2.to_k.weight", _WHAT)[1]
  motion = any(".motion_modules." in k for k in state)
  fields = dict(
      in_channels=key_shape(state, "conv_in.weight", _WHAT)[1],
      out_channels=key_shape(state, "conv_out.weight", _WHAT)[0],
      block_out_channels=channels, attention_levels=attention, layers_per_block=len(layers),
      cross_attention_dim=cross,
      use_linear_projection=len(key_shape(state, f"{mid}.proj_in.weight", _WHAT)) == 2,
      temporal_conv=any(".temporal_conv1." in k for k in state),
      motion_modules=motion,
      condition_channels=(key_shape(state, "conv_in_cond.weight", _WHAT)[1]
                          if "conv_in_cond.weight" in state else 0))
  if motion:
    fields["motion_mid_block"] = any(k.startswith("mid_block.motion_modules.") for k in state)
  fields.update(overrides)
  try:
    return UNetArch(**fields)
  except ValueError as e:
    raise CheckpointError(f"inconsistent UNet checkpoint: {e}") from None


def load_unet(unet_path, arch: UNetArch | None = None, motion_path=None, *,
              rng: jax.Array | None = None, adapters: str = "init", **arch_overrides):
  """Reads a UNet checkpoint file (and optionally motion modules): ``(arch, params)``.

  Args:
    unet_path: diffusers-layout UNet safetensors / PyTorch file.
    arch: the model; default inferred from the file (see :func:`infer_unet_arch`,
      which ``arch_overrides`` are passed to; with a motion file the
      motion-module options are switched on).
    motion_path: motion modules, ``MotionAdapter`` or original AnimateDiff layout.
    rng: key for freshly initialised adapters.
    adapters: see :func:`unet_from_state_dict`.
  """
  state = read_state_dict(unet_path)
  motion = read_state_dict(motion_path) if motion_path is not None else None
  if arch is None:
    if motion is not None:
      renamed = motion_state_from_original(motion)
      arch_overrides = {"motion_modules": True,
                        "motion_mid_block": any(k.startswith("mid_block.") for k in renamed),
                        **arch_overrides}
    arch = infer_unet_arch(state, **arch_overrides)
  elif arch_overrides:
    raise ValueError("give either arch or arch overrides, not both")
  try:
    return arch, unet_from_state_dict(state, arch, motion_state=motion, adapters=adapters,
                                      init_rng=rng)
  except CheckpointError as e:
    names = str(unet_path) + (f" + {motion_path}" if motion_path is not None else "")
    raise CheckpointError(f"{names}: {e}") from None
