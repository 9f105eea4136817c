r"""The toy-scale study's results: the table, the paper's claims checked, and pictures.

  python -m tools.toy_report --runs runs/toy --output runs/toy/report.md \
      [--figures runs/toy/figures --data data/benchmarks/procedural_v1]

Reads what ``tools/reproduce_toy.sh`` leaves behind: every LRM run's
``<runs>/lrm/<name>/eval/objects.jsonl`` (``vf3d_jax.evaluate``, one row per
benchmark object) and the video model's ``<runs>/eval_video/<split>/scores.jsonl``
(``tools.eval_video``). Runs named ``<row>_s<seed>`` are seeds of one row: an
object's score is its mean over the seeds that scored it, and the means and
95% intervals (percentile bootstrap over objects) are over those.

Each claim compares two rows on the same objects: the interval of the mean
paired difference decides ``agrees`` (all of it in the claimed direction),
``disagrees`` (all of it against) or ``unclear`` (it spans 0); rows that have
not been run say ``not run``. With ``--figures``, one picture per split: for
its first objects, input | a true novel view | each main row's render of that view.
"""

from __future__ import annotations

import collections
import json
import os
import re

from absl import flags
import numpy as np

from vf3d_jax import cli
from vf3d_jax.evaluation import evaluate as evaluate_lib

_RUNS = flags.DEFINE_string("runs", "runs/toy", "The study's runs folder (R in reproduce_toy.sh).")
_OUTPUT = flags.DEFINE_string("output", "", "Markdown file to write (default: stdout only).")
_FIGURES = flags.DEFINE_string("figures", "", "Folder for the per-split pictures (none if empty).")
_DATA = flags.DEFINE_string("data", "data/benchmarks/procedural_v1", "The benchmark (for --figures).")
_OBJECTS = flags.DEFINE_integer("figure_objects", 6, "Objects per split in the pictures.")

MAIN_ROWS = ("a_3d", "b_synth", "c_synth_ft")
ROW_NAMES = {
    "a_3d": "(a) 3D only", "b_synth": "(b) synthetic only", "c_synth_ft": "(c) synthetic → 3D",
    "abl1_pixel_one_stage": "ablation 1: pixel loss, one stage",
    "abl2_multi_stage": "ablation 2: + multi-stage", "abl3_lpips": "ablation 3: LPIPS for pixels",
    "abl4_opacity": "ablation 4: + opacity loss", "abl5_camera_noise": "ablation 5: + camera noise",
    "scale25": "(b) on 25% of the records", "scale50": "(b) on 50% of the records",
}
TABLE_METRICS = ("psnr", "iou", "lpips", "chamfer")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "iou": True, "lpips": False, "chamfer": False,
                    "fscore@0.05": True, "fscore@0.1": True}
SPLITS = ("seen", "unseen")
# (claim, better row, worse row, splits, metrics): "better" beats "worse" on each.
_ABLATION = ("abl1_pixel_one_stage", "abl2_multi_stage", "abl3_lpips", "abl4_opacity",
             "abl5_camera_noise")
CLAIMS = (
    ("1. synthetic data transfers to unseen kinds", "b_synth", "a_3d", ("unseen",), ("psnr", "iou")),
    ("2. fine-tuning on 3D improves on synthetic only", "c_synth_ft", "b_synth", SPLITS,
     ("psnr", "iou")),
    *((f"3. recipe: {ROW_NAMES[new].split(': ')[1]}", new, old, SPLITS, ("lpips", "iou"))
      for old, new in zip(_ABLATION, _ABLATION[1:])),
    ("4. more synthetic data: 50% over 25%", "scale50", "scale25", SPLITS, ("psnr", "iou")),
    ("4. more synthetic data: 100% over 50%", "b_synth", "scale50", SPLITS, ("psnr", "iou")),
)
BOOTSTRAP_SAMPLES, CONFIDENCE, SEED = 2000, 0.95, 0


def load_runs(runs: str) -> dict[str, dict[str, dict[str, dict]]]:
  """``{row: {run name: {(split, id): object row}}}`` for every evaluated LRM run."""
  out: dict[str, dict[str, dict]] = collections.defaultdict(dict)
  folder = os.path.join(runs, "lrm")
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    path = os.path.join(folder, name, "eval", evaluate_lib.ROWS)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, name, "eval",
                                                                   "summary.json")):
      continue  # not evaluated, or its evaluation did not finish
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    out[re.sub(r"_s\d+$", "", name)][name] = {(r["split"], r["id"]): r for r in rows}
  return dict(out)


def object_scores(runs: dict[str, dict], split: str, metric: str) -> dict[str, float]:
  """``{object id: the metric's mean over the row's seeds}`` for one row and split."""
  values = collections.defaultdict(list)
  for rows in runs.values():
    for (row_split, object_id), row in rows.items():
      if row_split == split and row.get(metric) is not None:
        values[object_id].append(float(row[metric]))
  return {k: float(np.mean(v)) for k, v in values.items()}


def interval(values) -> tuple[float, float]:
  return evaluate_lib.bootstrap_interval(np.asarray(values, np.float64), BOOTSTRAP_SAMPLES,
                                         CONFIDENCE, SEED)


def compare(better: dict[str, float], worse: dict[str, float], higher: bool):
  """``(mean difference, interval, verdict)`` of better - worse over shared objects."""
  shared = sorted(set(better) & set(worse))
  if not shared:
    return None
  sign = 1.0 if higher else -1.0
  gain = sign * (np.array([better[k] for k in shared]) - np.array([worse[k] for k in shared]))
  low, high = interval(gain)
  verdict = "agrees" if low > 0 else "disagrees" if high < 0 else "unclear"
  return float(gain.mean()), (low, high), verdict, len(shared)


def table(rows: dict[str, dict]) -> list[str]:
  lines = ["| row | seeds | " + " | ".join(f"{s} {m}" for s in SPLITS for m in TABLE_METRICS) + " |",
           "|---|---|" + "---|" * (len(SPLITS) * len(TABLE_METRICS))]
  for row in [r for r in ROW_NAMES if r in rows] + sorted(set(rows) - set(ROW_NAMES)):
    cells = []
    for split in SPLITS:
      for metric in TABLE_METRICS:
        scores = list(object_scores(rows[row], split, metric).values())
        if scores:
          low, high = interval(scores)
          cells.append(f"{np.mean(scores):.3g} [{low:.3g}, {high:.3g}]")
        else:
          cells.append("—")
    lines.append(f"| {ROW_NAMES.get(row, row)} | {len(rows[row])} | " + " | ".join(cells) + " |")
  return lines


def claims(rows: dict[str, dict]) -> list[str]:
  lines = ["| claim | split | metric | better − worse (in the better direction) | 95% interval | "
           "objects | verdict |", "|---|---|---|---|---|---|---|"]
  for text, better, worse, splits, metric_names in CLAIMS:
    for split in splits:
      for metric in metric_names:
        if better not in rows or worse not in rows:
          lines.append(f"| {text} | {split} | {metric} | — | — | — | not run |")
          continue
        result = compare(object_scores(rows[better], split, metric),
                         object_scores(rows[worse], split, metric), HIGHER_IS_BETTER[metric])
        if result is None:
          lines.append(f"| {text} | {split} | {metric} | — | — | 0 | not run |")
          continue
        mean, (low, high), verdict, count = result
        lines.append(f"| {text} | {split} | {metric} | {mean:+.4f} | [{low:+.4f}, {high:+.4f}] | "
                     f"{count} | {verdict} |")
  return lines


def video_lines(runs: str) -> list[str]:
  lines = ["| held-out orbits | guidance (image, text) | orbit PSNR | static PSNR | direction "
           "accuracy [95%] | claim 5 |", "|---|---|---|---|---|---|"]
  found = False
  for split in ("narrow", "unseen"):
    path = os.path.join(runs, "eval_video", split, "scores.jsonl")
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      for line in f:
        s = json.loads(line)
        if "orbit_psnr" not in s:
          continue
        found = True
        low, high = s["direction_accuracy_ci95"]
        ok = s["direction_accuracy"] >= 0.8 and s["orbit_psnr"] > s["static_psnr"]
        lines.append(f"| {split} ({s['num_videos']}) | {s['image_scale']:g}, {s['text_scale']:g} | "
                     f"{s['orbit_psnr']:.2f} | {s['static_psnr']:.2f} | "
                     f"{s['direction_accuracy']:.2f} [{low:.2f}, {high:.2f}] | "
                     f"{'agrees' if ok else 'disagrees'} |")
  return lines if found else ["Not run: no `eval_video/*/scores.jsonl` yet."]


def figures(rows: dict[str, dict], runs: str, data: str, output: str, count: int) -> list[str]:
  """Per split: input | a true novel view | each main row's (first seed's) render of it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import eval as eval_configs  # pylint: disable=g-import-not-at-top
  from vf3d_jax import pretrained  # pylint: disable=g-import-not-at-top

  config = eval_configs.get_config("cpu")
  config.eval.num_objects = count
  benchmark = evaluate_lib.find_benchmark(data)
  models = [(row, sorted(rows[row])[0]) for row in MAIN_ROWS if row in rows]
  scorers = []
  for row, name in models:
    arch, params = pretrained.load_lrm(os.path.join(runs, "lrm", name, "model.safetensors"))
    scorers.append(evaluate_lib.Scorer(arch, params, config, [], None))
  os.makedirs(output, exist_ok=True)
  written = []
  for split, shards in benchmark.splits.items():
    tiles = []
    for _, obj in evaluate_lib.iter_records(split, shards, config):
      if isinstance(obj, Exception):
        continue
      view = 0
      row = [obj.source_rgba[..., :3] * obj.source_rgba[..., 3:] + 1 - obj.source_rgba[..., 3:],
             obj.rgb[view]]
      for scorer in scorers:
        image = evaluate_lib.model_input(obj, config, scorer.arch.input_size)
        planes = scorer.planes(image, obj.source_camera)
        rgb, _ = scorer.render(planes, obj.c2w[view:view + 1], obj.intrinsics[view:view + 1],
                               obj.rgb.shape[1])
        row.append(rgb[0])
      tiles.append(row)
    if not tiles:
      continue
    cell = tiles[0][1].shape[0]
    sheet = np.ones((len(tiles) * (cell + 4) - 4, len(tiles[0]) * (cell + 4) - 4, 3), np.float32)
    for i, row in enumerate(tiles):
      for j, image in enumerate(row):
        image = np.asarray(Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
                           .resize((cell, cell), Image.BILINEAR), np.float32) / 255
        sheet[i * (cell + 4):i * (cell + 4) + cell, j * (cell + 4):j * (cell + 4) + cell] = image
    path = os.path.join(output, f"toy_{split}.jpg")
    Image.fromarray((sheet * 255).round().astype(np.uint8)).save(path, quality=90)
    columns = ["input", "truth"] + [ROW_NAMES[row] for row, _ in models]
    written.append(f"![{split}: {' | '.join(columns)}]({path})")
  return written


def report(runs: str, figures_dir: str = "", data: str = "", figure_objects: int = 6) -> str:
  rows = load_runs(runs)
  lines = ["# Toy-scale results", "",
           f"Rows evaluated: {', '.join(f'{r} ({len(v)} seeds)' for r, v in rows.items()) or 'none'}.",
           "", "## Benchmark scores (mean over objects [95% bootstrap interval])", "",
           *table(rows), "", "## The paper's claims", "", *claims(rows), "",
           "## Video model (claim 5: direction accuracy ≥ 0.8 and orbit PSNR above static)", "",
           *video_lines(runs), ""]
  if figures_dir and any(r in rows for r in MAIN_ROWS):
    lines += ["## Pictures", "", *figures(rows, runs, data, figures_dir, figure_objects), ""]
  return "\n".join(lines)


def main(argv):
  del argv
  if not os.path.isdir(_RUNS.value):
    raise FileNotFoundError(f"--runs {_RUNS.value}: no such folder")
  text = report(_RUNS.value, _FIGURES.value, _DATA.value, _OBJECTS.value)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value + ".tmp", "w") as f:
      f.write(text + "\n")
    os.replace(_OUTPUT.value + ".tmp", _OUTPUT.value)


if __name__ == "__main__":
  cli.run(main)
