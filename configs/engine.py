r"""The data engine: prompts -> first frames -> orbit videos -> features -> filter, elevation -> records.

  python -m vf3d_jax.data_engine --config configs/engine.py:tiny --workdir runs/engine \
      --config.video.model=runs/video --config.frames.model=runs/image
  python -m vf3d_jax.data_engine --config configs/engine.py:tiny --workdir runs/engine --stage=videos

Variants:

* ``tiny``: procedural captions as prompts (16 assets of the broad family), 32x32
  pixel-space models of configs/video.py:tiny, first frames rendered from each
  prompt's true asset, the automatic labeller, a tiny random feature extractor
  (set ``features.extractor=dinov2:<folder>`` for real DINOv2 features).
* ``sd15``: a prompt file, SD 1.5-sized video model (configs/video.py:sd15),
  text -> first frame with its image UNet, DINOv2-base features, hand labels.

Every stage records its inputs, seeds and model versions in
``<workdir>/stages/<stage>.json``; work is split into shards of
``shard_size`` prompts, each written atomically, so a rerun redoes nothing.
"""

import math

import ml_collections

from configs import benchmark as benchmark_configs
from configs import render as render_configs


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in ("tiny", "sd15"):
    raise ValueError(f"unknown engine variant {arg!r}; choose tiny or sd15")
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.variant = arg
  c.seed = 0
  c.shard_size = 8 if tiny else 64  # prompts per work shard (the unit of resumption and splitting)

  p = c.prompts = ml_collections.ConfigDict()
  p.source = "procedural" if tiny else "file"  # "file" (.txt, a prompt a line, or .jsonl) or "procedural"
  p.file = ""
  p.max_prompts = 0  # 0: all
  # Procedural prompts: captions of seeded assets (their true orbits feed the automatic labeller).
  p.procedural = render_configs.get_config("procedural")
  p.procedural.seed = 7  # not a benchmark seed (configs/benchmark.py)
  p.procedural.num_assets = 16
  p.procedural.resolution = 64
  p.procedural.supersample = 1
  p.procedural.views.num_orbit_views = 16
  p.procedural.views.num_random_views = 0
  p.procedural.views.radius = 2.4  # the orbits configs/video.py:tiny is tuned on
  p.procedural.views.orbit_elevation_min = 0.26
  p.procedural.procedural.shapes = ",".join(benchmark_configs.FAMILIES["broad"])
  p.procedural.procedural.max_primitives = 3
  p.procedural.progress = False

  f = c.frames = ml_collections.ConfigDict()
  # "model": text -> image with the image UNet at frames.model (EMU Video's factorisation);
  # "images": the user's images (frames.images: a folder, <prompt id>.png or listed in its
  # prompts.jsonl); "procedural": each procedural prompt's true first view.
  f.source = "procedural" if tiny else "model"
  f.model = ""  # an exported image model (train_video stage "image"), or its workdir
  f.images = ""

  v = c.video = ml_collections.ConfigDict()
  v.model = ""  # the fine-tuned video model's export (or workdir)
  v.batch_size = 4
  v.sampler = "ddim"
  v.num_steps = 20 if tiny else 50
  v.eta = 0.0
  v.image_scale = 2.0
  v.text_scale = 5.0 if not tiny else 2.0
  v.guidance_rescale = 0.0
  v.replace_first_frame = True

  x = c.features = ml_collections.ConfigDict()
  # "dinov2:<folder>" (Hugging Face layout), "lrm:<checkpoint>", or "random:<seed>" (tests only).
  x.extractor = "random:0" if tiny else "dinov2:models/dinov2-base"
  x.input_size = 32 if tiny else 224
  x.batch_size = 64

  lab = c.labels = ml_collections.ConfigDict()
  # "auto": the automatic labeller for procedural prompts (a stand-in for hand labels: each
  # video against its prompt's true orbit); else a labels file (video id, good/bad).
  lab.source = "auto" if tiny else ""
  lab.min_iou = 0.5  # auto: good when the mean silhouette IoU of frames 1..F-1 reaches this

  q = c.filter = ml_collections.ConfigDict()
  q.C = 1.0
  q.folds = 5
  q.threshold = 0.0  # keep videos whose SVM decision value is at least this

  e = c.elevation = ml_collections.ConfigDict()
  e.train = ""  # 3D orbit records with known elevations (the video model's tuning data)
  e.hidden = 256
  e.steps = 2000
  e.lr = 3e-3
  e.weight_decay = 1.0  # decoupled (AdamW); smaller values overfit a few hundred records
  e.val_fraction = 0.2
  e.max_records = 2000

  r = c.records = ml_collections.ConfigDict()
  r.name = "synthetic"
  # Cameras of the synthetic orbits: those of the 3D renders the video model was tuned on.
  r.radius = 2.4 if tiny else 0.0  # 0: render_orbits' default distance
  r.fov_degrees = render_configs.MODEL_FOV_DEGREES
  r.matting = "builtin"  # alpha for each frame (the opacity loss's masks)

  c.report = ml_collections.ConfigDict()
  c.report.sheet_videos = 6  # kept and rejected videos on the contact sheet, each
  c.report.sheet_frames = 8
  return c
