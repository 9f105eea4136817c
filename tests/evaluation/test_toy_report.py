"""tools/toy_report.py: seeds averaged per object, paired verdicts, video lines, pictures."""

import json
import os
import shutil

import numpy as np
from PIL import Image

from configs import benchmark as benchmark_configs
from tools import make_benchmark
from tools import toy_report
from vf3d_jax.inference.pipeline import DEMO_CHECKPOINT


def _write_run(runs, name, scores, model=None):
  """An evaluated run: ``scores`` is ``{(split, id): {metric: value}}``."""
  folder = runs / "lrm" / name / "eval"
  folder.mkdir(parents=True)
  with open(folder / "objects.jsonl", "w") as f:
    for (split, object_id), metrics in scores.items():
      f.write(json.dumps({"split": split, "id": object_id, "caption": "c", **metrics}) + "\n")
  (folder / "summary.json").write_text("{}")
  if model:
    shutil.copy(model, runs / "lrm" / name / "model.safetensors")


def _scores(psnr, iou=0.5, objects=40, seed=0):
  rng = np.random.default_rng(seed)
  return {(split, f"o{i}"): {"psnr": psnr + float(rng.normal(0, 0.5)), "iou": iou,
                             "lpips": 0.3, "chamfer": 0.1}
          for split in ("seen", "unseen") for i in range(objects)}


def test_rows_seeds_and_verdicts(tmp_path):
  runs = tmp_path / "runs"
  _write_run(runs, "a_3d_s0", _scores(14.0, seed=1))
  _write_run(runs, "a_3d_s1", _scores(16.0, seed=2))  # the row's object scores: means near 15
  _write_run(runs, "b_synth_s0", _scores(18.0, seed=3))
  _write_run(runs, "c_synth_ft_s0", _scores(17.0, seed=4))
  (runs / "lrm" / "unevaluated_s0").mkdir()  # no eval: not a row
  rows = toy_report.load_runs(str(runs))
  assert sorted(rows) == ["a_3d", "b_synth", "c_synth_ft"] and len(rows["a_3d"]) == 2
  a = toy_report.object_scores(rows["a_3d"], "seen", "psnr")
  assert len(a) == 40 and abs(np.mean(list(a.values())) - 15.0) < 0.3
  text = toy_report.report(str(runs))
  lines = text.splitlines()
  claim = lambda start, split, metric: next(
      l for l in lines if l.startswith(f"| {start}") and f"| {split} | {metric} |" in l)
  assert claim("1.", "unseen", "psnr").endswith("| 40 | agrees |")  # 18 against 15
  assert claim("2.", "seen", "psnr").endswith("| disagrees |")  # 17 against 18
  assert claim("2.", "seen", "iou").endswith("| unclear |")  # equal everywhere
  assert claim("4. more synthetic data: 50%", "seen", "psnr").endswith("| not run |")
  assert "| (a) 3D only | 2 | 15" in text
  assert "Not run: no `eval_video/*/scores.jsonl` yet." in text


def test_video_claim_reads_the_scores(tmp_path):
  folder = tmp_path / "eval_video" / "narrow"
  folder.mkdir(parents=True)
  lines = [{"test": "direction_losses"},
           {"image_scale": 2.0, "text_scale": 2.0, "num_videos": 32, "orbit_psnr": 19.5,
            "static_psnr": 17.0, "direction_accuracy": 0.9, "direction_accuracy_ci95": [0.8, 0.97]},
           {"image_scale": 1.0, "text_scale": 1.0, "num_videos": 32, "orbit_psnr": 16.0,
            "static_psnr": 17.0, "direction_accuracy": 0.9, "direction_accuracy_ci95": [0.8, 0.97]}]
  (folder / "scores.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  video = toy_report.video_lines(str(tmp_path))
  assert video[2] == "| narrow (32) | 2, 2 | 19.50 | 17.00 | 0.90 [0.80, 0.97] | agrees |"
  assert video[3].endswith("| disagrees |")  # it turns, but scores below a static clip


def test_pictures_show_input_truth_and_each_row(tmp_path):
  config = benchmark_configs.get_config("tiny")
  config.output_dir = str(tmp_path / "bench")
  path, _ = make_benchmark.make_benchmark(config)
  runs = tmp_path / "runs"
  for name in ("a_3d_s0", "b_synth_s0"):
    _write_run(runs, name, _scores(15.0, objects=2), model=DEMO_CHECKPOINT)
  text = toy_report.report(str(runs), str(tmp_path / "figures"), os.path.dirname(path),
                           figure_objects=2)
  assert "![seen: input | truth | (a) 3D only | (b) synthetic only]" in text
  sheet = np.asarray(Image.open(tmp_path / "figures" / "toy_unseen.jpg"))
  cell = 128  # configs/eval.py:cpu renders 128^2
  assert sheet.shape == (2 * cell + 4, 4 * cell + 3 * 4, 3)
  # Column 2 (the first model) is a render, not the white page.
  assert sheet[:cell, 2 * (cell + 4):3 * cell + 8].mean() < 250
