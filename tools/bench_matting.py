r"""The matting benchmark: mean IoU of each matte against known alpha.

  python -m tools.bench_matting                      # 40 cases, every built-in method
  python -m tools.bench_matting --cases 100 --methods grabcut
  python -m tools.bench_matting --figure docs/figures/matting_benchmark.jpg

Cases (vf3d_jax/evaluation/matting.py): procedural renders with exact alpha,
composited over plain, gradient, noise, clutter and photo-like backgrounds,
centred, off-centre or cut by the border. Prints one row per method (mean,
min, per background, per placement, seconds per image), then how the
confidence check (``check_matte``) judges each method's mattes; JSON on the
last line. ``--figure`` also draws the worst case of each background and one
more (columns: input, true matte, each method's matte).
"""

import json

from absl import flags
import numpy as np
from PIL import Image

from vf3d_jax import cli
from vf3d_jax.evaluation import matting as matting_benchmark
from vf3d_jax.inference import preprocess

_CASES = flags.DEFINE_integer("cases", 40, "Number of cases (they cycle through backgrounds).")
_SIZE = flags.DEFINE_integer("size", 256, "Image side.")
_SEED = flags.DEFINE_integer("seed", 0, "Benchmark seed.")
_FIGURE = flags.DEFINE_string("figure", "", "Write a figure of cases and mattes here (JPEG/PNG).")
_METHODS = flags.DEFINE_list("methods", ["builtin", "grabcut"],
                             "Registered matting methods to score.")


def main(argv):
  del argv
  cases = matting_benchmark.make_cases(_CASES.value, _SIZE.value, int(_SIZE.value * 0.625),
                                       seed=_SEED.value)
  results, per_case, methods = {}, {}, {}
  keys = (["mean_iou", "min_iou"] + [f"background/{b}" for b in matting_benchmark.BACKGROUNDS]
          + [f"placement/{p}" for p in matting_benchmark.PLACEMENTS])
  print("method   " + " ".join(f"{k.split('/')[-1]:>10}" for k in keys) + "   s/image")
  for name in _METHODS.value:
    try:  # registered names, rembg[:model] and auto, as preprocess.matting takes them
      matting_fn, resolved = preprocess._resolve_matting(name)  # pylint: disable=protected-access
    except (ValueError, RuntimeError) as e:
      raise SystemExit(f"error: matting {name!r}: {e}") from None
    methods[name] = matting_fn
    result = matting_benchmark.score(matting_fn, cases, check=True,
                                     check_options=preprocess.BUILTIN_MATTES.get(resolved, {}))
    results[name] = {k: v for k, v in result.items() if not k.startswith("per_case")}
    per_case[name] = result["per_case"]
    print(f"{name:<8} " + " ".join(f"{result.get(k, float('nan')):>10.3f}" for k in keys)
          + f"   {result['seconds_per_image']:.3f}")
  print(f"\nconfidence check (check_matte; failed = IoU < {matting_benchmark.FAILED_IOU}):")
  for name, result in results.items():
    print(f"{name:<8} warned {100 * result['warned_fraction']:.0f}%, failures warned "
          f"{result['failures_warned']}, good mattes warned {result['good_warned']}, "
          f"mean IoU of the unwarned {result['unwarned_mean_iou']:.3f}")
  if _FIGURE.value:
    _figure(cases, per_case, methods, _FIGURE.value)
  print(json.dumps(results))


def _figure(cases, per_case, methods, path):
  """Two cases per background (the last method's worst, then its first other
  case); columns: input, truth, each method's matte with its IoU in the title row."""
  last = np.asarray(per_case[list(methods)[-1]])
  rows = []
  for background in matting_benchmark.BACKGROUNDS:
    index = [i for i, c in enumerate(cases) if c["background"] == background]
    if not index:
      continue
    worst = min(index, key=lambda i: last[i])
    for i in [worst] + [j for j in index if j != worst][:1]:
      rgb = cases[i]["rgb"]
      tiles = [rgb, np.repeat(cases[i]["alpha"][..., None], 3, -1)]
      for matting_fn in methods.values():
        alpha = np.asarray(matting_fn(rgb))
        tiles.append(rgb * alpha[..., None] + (1 - alpha[..., None]))  # the cut-out on white
      rows.append(np.concatenate(tiles, axis=1))
  grid = np.round(np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
  Image.fromarray(grid).save(path, quality=85)
  print(f"figure: {path} (rows: 2 per background {matting_benchmark.BACKGROUNDS}; columns: "
        f"input, truth, {', '.join(methods)})")


if __name__ == "__main__":
  cli.run(main)
