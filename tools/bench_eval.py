r"""Benchmark of the evaluator itself: objects per second, and where the time goes.

  python -m tools.bench_eval                         # tiny benchmark, the demo model, cpu variant
  python -m tools.bench_eval --data data/benchmarks/procedural_v1 --objects 16

Renders ``configs/benchmark.py:tiny`` into a temporary folder unless ``--data``
names a benchmark, scores ``--objects`` objects of each split with
``configs/eval.py:<--variant>`` (the first object of the run compiles and is
left out of the timing) and prints, per split, objects per second and each
stage's seconds and share (preprocess, planes, render, image metrics, LPIPS,
mesh, geometry, CLIP). JSON on the last line.
"""

import json
import os
import tempfile

from absl import flags

from configs import benchmark as benchmark_configs
from configs import eval as eval_configs
from tools import make_benchmark
from vf3d_jax import cli
from vf3d_jax.evaluation import evaluate
from vf3d_jax.inference.pipeline import DEMO_CHECKPOINT

_DATA = flags.DEFINE_string("data", "", "Benchmark folder; default: the tiny benchmark, made here.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Model; default: the embedded demo model.")
_VARIANT = flags.DEFINE_string("variant", "cpu", "configs/eval.py variant.")
_OBJECTS = flags.DEFINE_integer("objects", 0, "Objects per split (0: all).")


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as root:
    data = _DATA.value
    if not data:
      config = benchmark_configs.get_config("tiny")
      config.output_dir = root
      make_benchmark.make_benchmark(config)
      data = os.path.join(root, "tiny")
    config = eval_configs.get_config(_VARIANT.value)
    config.eval.num_objects = _OBJECTS.value
    summary = evaluate.evaluate(config, _CHECKPOINT.value or DEMO_CHECKPOINT, data,
                                os.path.join(root, "eval"), progress=False)
  result = {}
  for split, part in summary["splits"].items():
    print(f"{split}: {part['objects']} objects, {part['objects_per_second']} objects/s")
    for stage, seconds in part["seconds_per_object"].items():
      print(f"  {stage:14s} {seconds:8.4f} s  {100 * part['stage_share'][stage]:5.1f}%")
    result[split] = {k: part[k] for k in ("objects", "objects_per_second", "seconds_per_object",
                                          "stage_share")}
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
