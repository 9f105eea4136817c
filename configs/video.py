r"""The multi-view video model: a video UNet with temporal adapters over an image UNet.

Two stages, one job (``python -m vf3d_jax.train_video``):

* ``stage="image"`` trains the spatial image UNet (and, for the small offline
  experiments, a small word-level text encoder) on single orbit views, for
  users without a pretrained image model;
* ``stage="video"`` adds the temporal adapters (a temporal convolution after
  each spatial convolution, a temporal attention after each spatial layer,
  first-frame conditioning channels), all identity at initialisation, and
  trains only them (``train.trainable``) on 16-frame orbit clips, with
  text and image guidance dropout.

Variants (the argument after the colon):

* ``tiny_image`` / ``tiny``: pixel-space 32x32, 16 frames, a small UNet and the
  word-level text encoder, on procedural orbits; CPU-sized::

    python -m tools.render_orbits --config configs/render.py:procedural \
        --config.num_assets=1024 --config.resolution=64 --config.views.num_random_views=0 \
        --config.views.radius=2.4 --config.views.orbit_elevation_min=0.26 \
        --config.procedural.patterns=solid --config.procedural.max_primitives=3 \
        --config.output_dir=data --config.name=orbits
    python -m vf3d_jax.train_video --config configs/video.py:tiny_image --workdir runs/image \
        --config.data.train=data/orbits/1.0.0
    python -m vf3d_jax.train_video --config configs/video.py:tiny --workdir runs/video \
        --config.data.train=data/orbits/1.0.0 --config.init.unet=runs/image/export

* ``sd15``: latent space over Stable Diffusion 1.5 (UNet, VAE and CLIP text
  encoder from a local copy of ``stable-diffusion-v1-5/stable-diffusion-v1-5``),
  optionally starting the temporal attention from AnimateDiff's motion
  modules; 256x256 clips of 16 frames (GPU)::

    python -m vf3d_jax.train_video --config configs/video.py:sd15 --workdir runs/sd15 \
        --config.data.train=data/orbits/1.0.0 --config.init.unet=sd15/unet \
        --config.latent.vae=sd15/vae --config.text.path=sd15 \
        --config.init.motion=animatediff/diffusion_pytorch_model.safetensors

Every stage writes ``<workdir>/export`` (a model directory ``python -m
vf3d_jax.sample_video --model`` reads, and the next stage's ``init.unet``).
"""

import ml_collections

# The adapters: everything the video stage trains.
ADAPTERS = r"^unet/.*(temporal_conv|motion_modules|conv_in_cond)"


def _unet(**overrides) -> ml_collections.ConfigDict:
  """UNetArch fields (vf3d_jax/models/unet.py documents each)."""
  unet = ml_collections.ConfigDict(dict(
      in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
      attention_levels=(True, True, True, False), layers_per_block=2, attention_heads=8,
      cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, use_linear_projection=False,
      flip_sin_to_cos=True, freq_shift=0, temporal_conv=True, motion_modules=True,
      motion_mid_block=True, motion_heads=8, motion_max_frames=32, condition_channels=5))
  unet.update(overrides)
  return unet


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # "image": train the spatial UNet; "video": train the temporal adapters only.
  config.stage = "video"
  config.seed = 0
  # Compute dtype of the UNet ("float32" or "bfloat16"); parameters stay float32.
  config.dtype = "float32"
  # Matmul precision of training: "highest" keeps float32 matmuls float32 on GPUs (no TF32) and
  # TPUs (no bfloat16 passes); "default" lets them trade accuracy for speed.
  config.precision = "highest"
  # Devices of the data-parallel mesh (0: all).
  config.num_devices = 0
  config.model = _unet()

  # Where the diffusion runs: "pixel" ([-1, 1] frames) or "vae" latents.
  config.latent = ml_collections.ConfigDict()
  config.latent.kind = "pixel"
  # The VAE: a diffusers vae/ folder or its .safetensors (kind="vae").
  config.latent.vae = ""
  # Frames through the VAE at once (memory bound for long clips).
  config.latent.chunk = 4

  config.text = ml_collections.ConfigDict()
  # "words": a small trainable word-level encoder; "clip": a pretrained CLIP
  # text encoder from `path` (an SD folder with text_encoder/ and tokenizer/).
  config.text.kind = "words"
  config.text.path = ""
  config.text.vocab_size = 4096
  config.text.max_length = 16
  config.text.width = 64

  config.init = ml_collections.ConfigDict()
  # The image UNet to start from: a diffusers unet/ folder or .safetensors (SD
  # 1.5 layout), or an exported model directory (a workdir's export/). Empty:
  # random (stage "image").
  config.init.unet = ""
  # AnimateDiff motion modules (diffusers MotionAdapter or original layout);
  # empty: identity-initialised temporal attention.
  config.init.motion = ""

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.num_train_timesteps = 1000
  config.diffusion.beta_schedule = "scaled_linear"
  config.diffusion.beta_start = 0.00085
  config.diffusion.beta_end = 0.012
  # Rescale so the last step is pure noise (EMU Video); pairs with v-prediction.
  config.diffusion.zero_terminal_snr = True
  config.diffusion.prediction_type = "v_prediction"
  # Loss weighting over timesteps: "none" or "min_snr".
  config.diffusion.weighting = "none"

  t = config.train = ml_collections.ConfigDict()
  t.steps = 1000
  t.batch_size = 2  # clips (stage "image": clips whose frames become images)
  t.lr = 1e-4
  t.warmup_steps = 100
  t.final_lr_fraction = 0.1
  t.b1 = 0.9
  t.b2 = 0.999
  t.weight_decay = 0.01
  t.grad_clip = 1.0
  # Moving average of the trained parameters, used for samples and the export
  # (0: none, the last parameters are used).
  t.ema_decay = 0.0
  # Parameters that train (regex over paths like unet/down_blocks_0/...) and,
  # within them, ones kept frozen.
  t.trainable = ADAPTERS
  t.frozen = ""
  # Guidance dropout: text only, first frame only, both.
  t.p_drop_text = 0.1
  t.p_drop_image = 0.1
  t.p_drop_both = 0.05
  t.remat = False
  t.fsdp = False
  t.log_every = 50
  t.checkpoint_every = 500
  t.keep_checkpoints = 2
  t.sample_every = 500

  d = config.data = ml_collections.ConfigDict()
  # Record folders with mixing weights: "path[:weight],path[:weight]".
  d.train = ""
  # Held-out records: first frames and captions for samples, clips to score them.
  d.eval = ""
  d.num_frames = 16
  d.frame_resolution = 256
  d.background = "white"
  d.num_workers = 2
  d.strict = False

  s = config.sample = ml_collections.ConfigDict()
  # "ddim" or "dpm_solver_pp" (2M), with "trailing" timesteps.
  s.sampler = "ddim"
  s.num_steps = 25
  s.eta = 0.0
  # Two-way guidance: x(0) + image_scale [x(I) - x(0)] + text_scale [x(I, p) - x(I)].
  s.image_scale = 2.0
  s.text_scale = 5.0
  # Guidance rescale φ of the zero-terminal-SNR paper (0: none; they use 0.7).
  s.guidance_rescale = 0.0
  # Hold the first frame in x_t at every step as well (vf3d_jax/video/sampling.py).
  s.replace_first_frame = False
  # Held-out clips sampled during training (and scored against their renders).
  s.num_videos = 4
  s.fps = 8
  # sample_video: clips per batch, and the first-frame framing (0 keeps an
  # image's framing; e.g. 0.8 matts and recentres a photo as vf3d_jax.infer).
  s.batch_size = 4
  s.foreground_ratio = 0.0

  if arg == "tiny_image":
    _tiny(config)
    config.stage = "image"
    config.model.update(temporal_conv=False, motion_modules=False, condition_channels=0)
    t.trainable = r"^(unet|text)/"
    t.steps = 1500
    t.lr = 1e-3
    t.batch_size = 2
  elif arg == "tiny":
    _tiny(config)
    t.steps = 2400
    t.lr = 1e-3
    t.sample_every = 800
    config.sample.num_videos = 4
  elif arg == "sd15":
    config.latent.kind = "vae"
    config.text.kind = "clip"
    config.text.max_length = 77
    config.text.width = 768
    d.frame_resolution = 256
    t.batch_size = 8
    t.remat = True
    config.dtype = "bfloat16"
    config.precision = "default"  # the bfloat16 path: no float32 matmuls to keep exact
  else:
    raise ValueError(f"unknown video config {arg!r}: tiny_image, tiny or sd15")
  return config


def _tiny(config) -> None:
  """Pixel space 32x32, 16 frames, a ~2M-parameter UNet; trains on 2 CPU cores."""
  config.model = _unet(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                       attention_levels=(False, True, True), layers_per_block=1,
                       attention_heads=4, cross_attention_dim=64, norm_num_groups=8,
                       motion_heads=4, condition_channels=4)
  config.text.width = 64
  config.data.frame_resolution = 32
  config.data.num_workers = 1
  t = config.train
  t.warmup_steps = 50
  t.log_every = 25
  t.checkpoint_every = 250
  t.sample_every = 500
  config.sample.num_steps = 20
  config.sample.num_videos = 8
