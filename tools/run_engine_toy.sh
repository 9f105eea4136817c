#!/usr/bin/env bash
# A short tiny-scale run of the whole data path (about 50 min on 2 CPU cores): orbits -> image stage (400 steps)
# -> adapters (600 steps) -> data engine on 48 procedural prompts -> 20 LRM steps on the synthetic records mixed
# with 3D ones. Every command resumes where it stopped when run again. Usage: tools/run_engine_toy.sh [workdir]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="nice -n 10 .venv/bin/python"
R=${1:-runs/toy_engine}
$PY -m tools.render_orbits --config configs/render.py:procedural --config.num_assets=256 \
  --config.resolution=64 --config.supersample=1 --config.views.num_random_views=0 \
  --config.views.radius=2.4 --config.views.orbit_elevation_min=0.26 \
  --config.procedural.patterns=solid --config.procedural.max_primitives=3 \
  --config.output_dir=data --config.name=orbits_toy --config.progress=False
$PY -m vf3d_jax.train_video --config configs/video.py:tiny_image --workdir $R/image \
  --config.data.train=data/orbits_toy/1.0.0 --config.train.steps=400 --config.train.sample_every=100000
$PY -m vf3d_jax.train_video --config configs/video.py:tiny --workdir $R/video \
  --config.data.train=data/orbits_toy/1.0.0 --config.init.unet=$R/image/export \
  --config.train.steps=600 --config.train.sample_every=100000
$PY -m vf3d_jax.data_engine --config configs/engine.py:tiny --workdir $R/engine \
  --config.prompts.procedural.num_assets=48 --config.prompts.procedural.procedural.patterns=solid \
  --config.video.model=$R/video --config.features.extractor=lrm:examples/lrm_tiny.safetensors \
  --config.features.input_size=64 --config.elevation.train=data/orbits_toy/1.0.0 \
  --config.labels.min_iou=0.6
$PY -m vf3d_jax.train_lrm --config configs/lrm.py:tiny --workdir $R/lrm \
  --config.data.train=$R/engine/records:1,data/orbits_toy/1.0.0:0.2 --config.train.steps=20
