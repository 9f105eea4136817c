r"""Evaluation settings: ``python -m vf3d_jax.evaluate`` (see vf3d_jax/evaluation/evaluate.py).

Variants:

* ``procedural`` (default): record benchmarks (configs/benchmark.py) at the
  records' own resolution, every novel view, 128^3 mesh grid, 64 + 64
  samples a ray (the released renderer's settings).
* ``cpu``: the same protocol sized for 2 CPU cores: 128^2 views, 8 novel views
  an object, 96^3 mesh grid, 24 + 24 samples (what the tiny recipe trains with).
* ``images``: a folder of images with optional prompts: CLIP scores of an
  8-view turntable.
* ``tiny``: seconds-sized, for tests.

  python -m vf3d_jax.evaluate --data data/benchmarks/procedural_v1 --output outputs/eval
  python -m vf3d_jax.evaluate --checkpoint model.safetensors --data data/benchmarks/procedural_v1 \
      --output outputs/eval --config configs/eval.py:cpu --config.clip.models=clip-vit-b32
"""

import ml_collections

from configs import infer as infer_configs

VARIANTS = ("procedural", "cpu", "images", "tiny")


def get_config(arg: str = "procedural") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown evaluation variant {arg!r}; choose one of {', '.join(VARIANTS)}")
  # The inference settings (model, preprocess, render, mesh) are infer's; evaluation adds its own.
  c = infer_configs.get_config("vfusion3d")
  c.variant = arg
  c.render.enabled = True
  c.render.resolution = 0  # views' side; 0: the records' own (images: 256)
  c.render.num_views = 8  # turntable views of image-only sets (CLIP scores)
  c.mesh.resolution = 128
  # Geometry is scored on the marching-cubes surface itself: no texture, cleanup or decimation.
  c.mesh.texture = "vertex"
  c.mesh.min_component = 0.0
  c.mesh.max_faces = 0
  c.mesh.coarse_block = 0  # every grid point queried, so the scores are the full grid's

  e = c.eval = ml_collections.ConfigDict()
  e.source_view = 0  # the input view of each record (0: its first orbit view)
  e.num_views = 0  # novel views scored per object, evenly spaced over the others; 0: all
  e.num_objects = 0  # objects per split; 0: all
  e.splits = ""  # comma-separated splits to score; "": every split found
  # Records: keep the input view's framing (True: recentre it as infer does; see the protocol).
  e.recenter_records = False
  e.canonical_distance = 1.0  # the model frame's source-camera distance (as in training)
  e.lpips_weights = ""  # "": the real VGG16 + v0.1 weights (see vf3d_jax.losses.lpips)
  e.geometry_points = 10_000  # points sampled on the extracted mesh
  e.fscore_thresholds = (0.05, 0.1)  # world units; procedural objects span [-1, 1]
  e.iou_threshold = 0.5  # silhouette opacity / alpha threshold
  e.bootstrap_samples = 1000
  e.confidence = 0.95
  e.seed = 0  # bootstrap resampling
  e.sheet_objects = 8  # objects per split on the contact sheet
  e.sheet_views = 4  # ground-truth / predicted views per object on it

  clip = c.clip = ml_collections.ConfigDict()
  # Comma-separated local Hugging Face CLIP folders (e.g. ViT-L/14 and ViT-B/32); "": no CLIP.
  clip.models = ""
  clip.num_views = 8  # views per object for CLIP scores (evenly spaced over the scored views)

  if arg == "cpu":
    c.render.resolution = 128
    c.render.num_coarse = c.render.num_fine = 24
    c.render.mode = "clean"
    e.num_views = 8
    c.mesh.resolution = 96
  elif arg == "images":
    c.render.resolution = 256
  elif arg == "tiny":
    c.render.resolution = 32
    c.render.num_coarse = c.render.num_fine = 8
    c.render.mode = "clean"
    c.render.num_views = 4
    e.num_views = 4
    e.geometry_points = 2_000
    e.bootstrap_samples = 200
    e.sheet_objects, e.sheet_views = 2, 2
    clip.num_views = 2
    c.mesh.resolution = 32
  return c
