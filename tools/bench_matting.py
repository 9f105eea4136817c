r"""The matting benchmark: mean IoU of each matte against known alpha.

  python -m tools.bench_matting                      # 40 cases, every built-in method
  python -m tools.bench_matting --cases 100 --methods grabcut

Cases (vf3d_jax/evaluation/matting.py): procedural renders with exact alpha,
composited over plain, gradient, noise, clutter and photo-like backgrounds,
centred, off-centre or cut by the border. Prints one row per method (mean,
min, per background, per placement, seconds per image), then how the
confidence check (``check_matte``) judges each method's mattes; JSON on the
last line.
"""

import json

from absl import flags

from vf3d_jax import cli
from vf3d_jax.evaluation import matting as matting_benchmark
from vf3d_jax.inference import preprocess

_CASES = flags.DEFINE_integer("cases", 40, "Number of cases (they cycle through backgrounds).")
_SIZE = flags.DEFINE_integer("size", 256, "Image side.")
_SEED = flags.DEFINE_integer("seed", 0, "Benchmark seed.")
_METHODS = flags.DEFINE_list("methods", ["builtin", "grabcut"],
                             "Registered matting methods to score.")


def main(argv):
  del argv
  cases = matting_benchmark.make_cases(_CASES.value, _SIZE.value, int(_SIZE.value * 0.625),
                                       seed=_SEED.value)
  results = {}
  keys = (["mean_iou", "min_iou"] + [f"background/{b}" for b in matting_benchmark.BACKGROUNDS]
          + [f"placement/{p}" for p in matting_benchmark.PLACEMENTS])
  print("method   " + " ".join(f"{k.split('/')[-1]:>10}" for k in keys) + "   s/image")
  for name in _METHODS.value:
    if name not in preprocess.MATTING_METHODS:
      raise SystemExit(f"unknown matting method {name!r}; registered: "
                       f"{sorted(preprocess.MATTING_METHODS)}")
    result = matting_benchmark.score(preprocess.MATTING_METHODS[name], cases, check=True,
                                     check_options=preprocess.BUILTIN_MATTES.get(name, {}))
    results[name] = {k: v for k, v in result.items() if not k.startswith("per_case")}
    print(f"{name:<8} " + " ".join(f"{result[k]:>10.3f}" for k in keys)
          + f"   {result['seconds_per_image']:.3f}")
  print(f"\nconfidence check (check_matte; failed = IoU < {matting_benchmark.FAILED_IOU}):")
  for name, result in results.items():
    print(f"{name:<8} warned {100 * result['warned_fraction']:.0f}%, failures warned "
          f"{result['failures_warned']}, good mattes warned {result['good_warned']}, "
          f"mean IoU of the unwarned {result['unwarned_mean_iou']:.3f}")
  print(json.dumps(results))


if __name__ == "__main__":
  cli.run(main)
