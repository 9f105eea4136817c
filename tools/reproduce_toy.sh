#!/usr/bin/env bash
# VFusion3D at toy scale on the procedural world (docs/toy_reproduction.md): every row of the results
# table from nothing. Each stage is a resumable command (rerun the script after a kill and it picks up
# where it stopped; finished stages return at once).
#
#   tools/reproduce_toy.sh [stage ...]      stages: data video engine lrm ablation scale eval report
#                                           all (default)
#
# Sizes (the protocol's defaults, cut where 2 CPU cores demand it; docs/toy_reproduction.md says which):
#   broad family  = all 6 primitive kinds, every colour and pattern, <= 3 primitives
#   narrow family = sphere, box, cylinder ("3D data"): N3D = 300 multi-view assets
#   single views  = 20000 broad assets, one random view each, with captions (the image stage)
#   engine        = 2000 broad prompts -> first frames (image model) -> orbits (video model) -> filter,
#                   elevation -> synthetic records
#   LRM           = configs/lrm.py:toy, 8000 steps of 8 objects x 2 views, for (a) 3D only, (b) synthetic only,
#                   (c) synthetic then 2000 steps of fine-tuning on 3D; seeds 0 and 1
# Environment: R (runs folder, default runs/toy), D (data folder, default data), SEEDS (default "0 1"),
# PROMPTS (engine prompts, default 2000: about 16 s a video on 2 cores, so 9 h; 500 fits 2.3 h),
# FRESH (1: train the image prior and the video model again instead of using the committed
# examples/image_model and examples/video_model, which this script's video stage made).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="nice -n 10 .venv/bin/python"
R=${R:-runs/toy}
D=${D:-data}
SEEDS=${SEEDS:-0 1}
PROMPTS=${PROMPTS:-2000}
BENCH=$D/benchmarks/procedural_v1
NARROW=$D/narrow3d/1.0.0            # LRM 3D data: 128^2, 16 orbit + 4 random views
NARROW_VIDEO=$D/narrow3d_video/1.0.0  # the same assets, 64^2 orbits framed for the video model
SINGLE=$D/broad_single/1.0.0         # image stage data
SYNTH=$R/engine/records
FRESH=${FRESH:-0}
# The video stage's models: the committed ones unless FRESH=1 (then the stage trains them in $R).
if [ "$FRESH" = 1 ] || [ ! -f examples/video_model/video_model.json ]; then
  IMAGE_MODEL=$R/image; VIDEO_MODEL=$R/video
else
  IMAGE_MODEL=examples/image_model; VIDEO_MODEL=examples/video_model
fi
mkdir -p "$R"

NARROW_KINDS=sphere,box,cylinder   # configs/benchmark.py FAMILIES
UNSEEN_KINDS=ellipsoid,cone,torus
STAGES="data video engine lrm ablation scale eval report"
# render NAME [flags...]: procedural assets (<= 3 primitives) -> $D/NAME/1.0.0
render() {
  local name=$1; shift
  $PY -m tools.render_orbits --config configs/render.py:procedural --config.name=$name \
    --config.procedural.max_primitives=3 --config.output_dir=$D --config.progress=False "$@"
}
# How the video model sees objects: 64^2 orbits at distance 2.4, no random views.
VIDEO_VIEWS="--config.resolution=64 --config.supersample=1 --config.views.num_random_views=0 \
  --config.views.radius=2.4 --config.views.orbit_elevation_min=0.26"

stage_data() {
  $PY -m tools.make_benchmark --config configs/benchmark.py:procedural_v1 \
    --config.output_dir=$D/benchmarks
  local narrow="--config.procedural.shapes=$NARROW_KINDS --config.num_assets=300 --config.seed=2001"
  render narrow3d $narrow --config.resolution=128
  render narrow3d_video $narrow $VIDEO_VIEWS
  # Held-out orbits for the video model: new narrow assets, and the kinds 3D data never shows.
  render video_eval_narrow --config.procedural.shapes=$NARROW_KINDS --config.num_assets=32 \
    --config.seed=2002 $VIDEO_VIEWS
  render video_eval_unseen --config.procedural.shapes=$UNSEEN_KINDS --config.num_assets=32 \
    --config.seed=2003 $VIDEO_VIEWS
  render broad_single --config.num_assets=20000 --config.seed=3001 $VIDEO_VIEWS \
    --config.views.num_orbit_views=1 --config.views.random_azimuth_offset=True
}

stage_video() {
  # The image prior sees the broad family; the temporal layers only the narrow 3D orbits.
  if [ "$VIDEO_MODEL" = "$R/video" ]; then
  $PY -m vf3d_jax.train_video --config configs/video.py:tiny_image --workdir $R/image \
    --config.data.train=$SINGLE --config.data.num_frames=1 --config.train.batch_size=32 \
    --config.train.steps=4000 --config.train.sample_every=100000
  $PY -m vf3d_jax.train_video --config configs/video.py:tiny --workdir $R/video \
    --config.data.train=$NARROW_VIDEO --config.init.unet=$R/image/export \
    --config.train.steps=3000 --config.train.sample_every=100000
  else
    echo "using the committed $IMAGE_MODEL and $VIDEO_MODEL (FRESH=1 trains them again)"
  fi
  for split in narrow unseen; do
    # Resumable: settings already in scores.jsonl are skipped.
    $PY -m tools.eval_video --model $VIDEO_MODEL \
      --data $D/video_eval_$split/1.0.0 --num_videos 32 --guidance 1,1 --guidance 2,2 \
      --output $R/eval_video/$split
  done
}

stage_engine() {
  $PY -m vf3d_jax.data_engine --config configs/engine.py:tiny --workdir $R/engine \
    --config.prompts.procedural.num_assets=$PROMPTS --config.prompts.procedural.seed=4001 \
    --config.frames.source=model --config.frames.model=$IMAGE_MODEL \
    --config.video.model=$VIDEO_MODEL --config.features.extractor=lrm:examples/lrm_tiny.safetensors \
    --config.features.input_size=64 --config.elevation.train=$NARROW_VIDEO --config.labels.min_iou=0.6
}

# train_lrm NAME DATA [flags...]: a toy LRM run, exported for evaluation.
train_lrm() {
  local name=$1 data=$2; shift 2
  $PY -m vf3d_jax.train_lrm --config configs/lrm.py:toy --workdir $R/lrm/$name \
    --config.data.train=$data --config.data.eval=$BENCH/seen/1.0.0 "$@"
  [ -f $R/lrm/$name/model.safetensors ] || \
    $PY -m tools.export_lrm --workdir $R/lrm/$name --output $R/lrm/$name/model.safetensors
}

stage_lrm() {
  for seed in $SEEDS; do
    train_lrm a_3d_s$seed $NARROW --config.seed=$seed
    train_lrm b_synth_s$seed $SYNTH --config.seed=$seed
    # (c): (b)'s weights, fine-tuned on 3D renders with the last stage's resolution.
    train_lrm c_synth_ft_s$seed $NARROW --config.seed=$seed --config.train.init_from=$R/lrm/b_synth_s$seed/model.safetensors \
      --config.train.steps=2000 "--config.train.stages=((2000,64,16,24,24),)" \
      --config.train.lr=3e-4 --config.train.warmup_steps=10
  done
}

stage_ablation() {
  # The recipe on synthetic data, one change at a time (seed 0).
  local base="--config.loss.mse=1 --config.loss.lpips=0 --config.loss.opacity=0 \
    --config.train.camera_noise.rotation_deg=0 --config.train.camera_noise.translation=0 \
    --config.train.camera_noise.focal=0"
  train_lrm abl1_pixel_one_stage $SYNTH $base "--config.train.stages=((3000,128,32,24,24),)"
  train_lrm abl2_multi_stage $SYNTH $base
  train_lrm abl3_lpips $SYNTH $base --config.loss.mse=0 --config.loss.lpips=1
  train_lrm abl4_opacity $SYNTH $base --config.loss.mse=0 --config.loss.lpips=1 --config.loss.opacity=0.5
  train_lrm abl5_camera_noise $SYNTH --config.loss.mse=0 --config.loss.lpips=1 --config.loss.opacity=0.5
}

stage_scale() {
  # Synthetic data scale: the first 25% and 50% of the engine's records (100% is (b)).
  train_lrm scale25 $SYNTH@0.25 --config.seed=0
  train_lrm scale50 $SYNTH@0.5 --config.seed=0
}

stage_eval() {
  for run in $R/lrm/*/; do
    [ -f $run/model.safetensors ] || continue
    $PY -m vf3d_jax.evaluate --config configs/eval.py:cpu --checkpoint $run/model.safetensors \
      --data $BENCH --output $run/eval
  done
}

stage_report() {
  # The table, the claims' verdicts and the pictures, from whatever has been evaluated so far.
  $PY -m tools.toy_report --runs $R --output $R/report.md --figures $R/figures --data $BENCH
}

stages=${*:-all}
[ "$stages" = all ] && stages=$STAGES
for s in $stages; do
  echo "== $s ($(date -u +%H:%M))"
  stage_$s
done
