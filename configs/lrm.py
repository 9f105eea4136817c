r"""LRM configs: the released VFusion3D architecture and smaller variants.

Variants (the argument after the colon):

* ``vfusion3d``: the released model (452,135,700 parameters), for inference with
  the released weights and for fine-tuning on a GPU/TPU.
* ``small``: a ~60M-parameter model with the same structure, for single-GPU experiments.
* ``tiny``: ~0.3M parameters, 64 px input; trains on 2 CPU cores.

Usage:
  python -m vf3d_jax.infer --config configs/lrm.py:tiny --config.model.layers=4 ...
"""

import ml_collections


def _arch(**overrides):
  """The released architecture, as a dict (mirrors vf3d_jax.models.lrm.LRMArch)."""
  arch = dict(
      encoder=dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=14, pos_grid=37,
                   pos_resize="legacy", eps=1e-6),
      camera_dim=16, camera_embed_dim=1024, width=1024, layers=16, heads=16, mlp_dim=4096,
      eps=1e-6, triplane_res=32, triplane_channels=80, decoder_hidden=64, decoder_layers=4,
      input_size=512)
  encoder = overrides.pop("encoder", {})
  arch.update(overrides)
  arch["encoder"].update(encoder)
  return arch


VARIANTS = {
    "vfusion3d": _arch(),
    "small": _arch(encoder=dict(width=384, depth=12, heads=6, mlp_dim=1536),
                   camera_embed_dim=512, width=512, layers=8, heads=8, mlp_dim=2048,
                   triplane_channels=40),
    "tiny": _arch(encoder=dict(width=64, depth=2, heads=2, mlp_dim=128, patch_size=8, pos_grid=8),
                  camera_embed_dim=64, width=64, layers=2, heads=2, mlp_dim=128,
                  triplane_res=8, triplane_channels=16, decoder_hidden=32, input_size=64),
}


def get_config(arg: str = "vfusion3d") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown LRM variant {arg!r}; choose one of {sorted(VARIANTS)}")
  config = ml_collections.ConfigDict()
  config.variant = arg
  config.model = _arch() if arg == "vfusion3d" else VARIANTS[arg]
  config.dtype = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32)
  config.attention_impl = ""  # "" (XLA), "xla" or "cudnn"
  config.seed = 0
  return config
