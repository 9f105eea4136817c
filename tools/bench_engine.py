r"""Benchmark of the data engine: videos per second per device, stage by stage.

  python -m tools.bench_engine                      # tiny: configs/video.py:tiny sizes, random weights (CPU)
  python -m tools.bench_engine --video sd15 --prompts 64 --batch 8   # SD 1.5 sizes (a GPU; random weights)
  python -m tools.bench_engine --model runs/video --prompts 64       # a trained export

Runs the shard stages (frames from procedural truth, videos, features,
automatic labels) and the records stage on ``--prompts`` procedural prompts in
a temporary workdir, after one warm-up shard that compiles (left out of the
timing), and prints seconds per video of each stage and videos per second per
device. The video model is the export ``--model`` or, without one, random
weights at the ``--video`` sizes of configs/video.py. JSON on the last line.
"""

import json
import os
import tempfile
import time

from absl import flags
import jax

from configs import engine as engine_configs
from configs import video as video_configs
from vf3d_jax import cli
from vf3d_jax.engine import engine
from vf3d_jax.engine import features
from vf3d_jax.video import model as model_lib

_MODEL = flags.DEFINE_string("model", "", "A video model export; default: random weights.")
_VIDEO = flags.DEFINE_string("video", "tiny", "configs/video.py variant for random weights.")
_PROMPTS = flags.DEFINE_integer("prompts", 16, "Prompts timed (after a warm-up shard).")
_BATCH = flags.DEFINE_integer("batch", 4, "Videos per sampler call (= the shard size here).")
_STEPS = flags.DEFINE_integer("steps", 20, "Sampler steps.")
_EXTRACTOR = flags.DEFINE_string("extractor", "random:0", "Feature extractor spec.")
_ELEVATION = flags.DEFINE_string(
    "elevation_records", "", "3D orbit records: also fit the elevation MLP on their first views "
    "(at the video model's frame size) and report its held-out error.")
_INPUT_SIZE = flags.DEFINE_integer("input_size", 0, "Extractor input size (0: the frame size, "
                                   "rounded down to a multiple of 8).")


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as root:
    model_dir = _MODEL.value
    if not model_dir:
      config = video_configs.get_config(_VIDEO.value)
      spec = model_lib.spec_from_config(config)
      model = model_lib.VideoModel(spec)
      model_dir = model_lib.save_export(os.path.join(root, "video"), spec,
                                        features.random_params(model.param_shapes(), 0))
    spec = model_lib.read_spec(model_dir)
    config = engine_configs.get_config("tiny")
    config.video.model = model_dir
    config.video.num_steps = _STEPS.value
    config.video.batch_size = config.shard_size = _BATCH.value
    config.features.extractor = _EXTRACTOR.value
    config.features.input_size = _INPUT_SIZE.value or min(224, spec.resolution // 8 * 8 or 8)
    config.prompts.procedural.num_assets = _PROMPTS.value + _BATCH.value
    config.prompts.procedural.views.num_orbit_views = spec.num_frames
    config.records.matting = "builtin"
    workdir = os.path.join(root, "engine")
    engine.run(config, workdir, ["prompts"], progress=False)
    prompts = engine.read_prompts(engine.Workdir(workdir))
    work = engine.Workdir(workdir)
    models = engine.Models(config)
    seconds = {}
    stages = ("frames", "videos", "features", "labels")
    count = engine.num_shards(prompts, config.shard_size)
    for shard in range(count):
      rows = engine.shard_prompts(prompts, shard, config.shard_size)
      for stage in stages:
        start = time.perf_counter()
        if stage == "frames":
          out = engine.stage_frames(config, models, rows, shard)
        elif stage == "videos":
          out = engine.stage_videos(config, models, rows, shard, work)
        elif stage == "features":
          out = engine.stage_features(config, models, rows, shard, work)
        else:
          out = engine.stage_labels(config, models, rows, shard, work)
        engine.save_npz(work.shard(stage, shard), **out)
        if shard > 0:  # shard 0 compiles
          seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
  timed = len(prompts) - config.shard_size
  per_video = {k: v / timed for k, v in seconds.items()}
  total = sum(per_video.values())
  devices = jax.device_count()
  print(f"{timed} videos ({spec.num_frames} frames of {spec.resolution}², {_STEPS.value} steps, "
        f"batch {_BATCH.value}) on {devices} {jax.devices()[0].platform} device(s)")
  for stage, t in per_video.items():
    print(f"  {stage:9s} {t:8.4f} s/video  {100 * t / total:5.1f}%")
  print(f"  {total:.4f} s/video: {1 / total / devices:.3f} videos/s per device")
  result = {"videos": timed, "seconds_per_video": per_video,
            "videos_per_second_per_device": 1 / total / devices,
            "platform": jax.devices()[0].platform, "devices": devices}
  if _ELEVATION.value:
    config.elevation.train = _ELEVATION.value
    start = time.perf_counter()
    report = engine.fit_elevation(config, models, None)
    print(f"elevation MLP on {report['n_train']} + {report['n_val']} records "
          f"({config.features.extractor}): held-out MAE {report['val_mae_deg']:.2f} deg, "
          f"median {report['val_median_ae_deg']:.2f} deg (predicting the mean: "
          f"{report['val_mean_baseline_mae_deg']:.2f} deg); {time.perf_counter() - start:.1f} s")
    result["elevation"] = report
  print(json.dumps(result, default=str))


if __name__ == "__main__":
  cli.run(main)
