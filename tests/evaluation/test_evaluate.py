"""The evaluator end to end, its protocol's camera mapping, its statistics and the benchmark."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from configs import benchmark as benchmark_configs
from configs import eval as eval_configs
from tests.evaluation.test_clip_score import clip_folder  # pylint: disable=unused-import
from tools import make_benchmark
from vf3d_jax.data import records
from vf3d_jax.data import render_orbits
from vf3d_jax.evaluation import evaluate
from vf3d_jax.evaluation import metrics
from vf3d_jax.inference.pipeline import DEMO_CHECKPOINT
from vf3d_jax.rendering import cameras

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  config = benchmark_configs.get_config("tiny")
  config.output_dir = str(tmp_path_factory.mktemp("bench"))
  path, _ = make_benchmark.make_benchmark(config)
  return os.path.dirname(path), config


def _config(**eval_fields):
  config = eval_configs.get_config("tiny")
  config.eval.update(eval_fields)
  return config


@pytest.fixture(scope="module")
def scored(bench, tmp_path_factory):
  data, _ = bench
  output = str(tmp_path_factory.mktemp("eval"))
  summary = evaluate.evaluate(_config(), DEMO_CHECKPOINT, data, output, progress=False)
  return output, summary


def test_scores_every_object_with_intervals_and_pictures(scored):
  output, summary = scored
  rows = [json.loads(line) for line in open(os.path.join(output, "objects.jsonl"))]
  assert [r["split"] for r in rows] == ["seen"] * 4 + ["unseen"] * 4
  assert all(r["id"].startswith(("procedural-1001-", "procedural-1002-")) for r in rows)
  for row in rows:
    assert row["views"] == 4 and 0 <= row["iou"] <= 1 and 0 < row["lpips"] < 1
    assert row["chamfer"] > 0 and 0 <= row["fscore@0.05"] <= row["fscore@0.1"] <= 1
    assert set(row["seconds"]) >= {"preprocess", "planes", "render", "lpips", "mesh", "geometry"}
  for split in ("seen", "unseen"):
    part = summary["splits"][split]
    assert part["objects"] == 4 and part["objects_per_second"] > 0
    assert abs(sum(part["stage_share"].values()) - 1) < 1e-3
    for name in ("psnr", "ssim", "lpips", "iou", "chamfer", "fscore@0.05", "fscore@0.1"):
      s = part["metrics"][name]
      values = [r[name] for r in rows if r["split"] == split]
      assert s["mean"] == pytest.approx(np.mean(values)) and s["n"] == 4
      assert s["median"] == pytest.approx(np.median(values))
      assert s["ci"][0] <= s["mean"] <= s["ci"][1]
    assert set(part["metrics"]) == {"psnr", "ssim", "iou", "lpips", "accuracy", "completeness",
                                    "chamfer"} | {f"{m}@{t}" for m in ("precision", "recall", "fscore")
                                                  for t in (0.05, 0.1)}
  assert json.load(open(os.path.join(output, "summary.json"))) == summary
  assert "| psnr ↑ |" in open(os.path.join(output, "summary.md")).read()
  sheet = np.asarray(Image.open(os.path.join(output, "sheet_unseen.png")))
  # 2 objects x (input + 2 truth + 2 predicted) cells of 128 px, gaps and a label strip.
  assert sheet.shape == (16 + 2 * 128 + 4, 5 * 128 + 2 * 4, 3)


def test_a_rerun_resumes_and_other_settings_are_refused(bench, scored, tmp_path):
  data, _ = bench
  output, summary = scored
  before = open(os.path.join(output, "objects.jsonl")).read()
  again = evaluate.evaluate(_config(), DEMO_CHECKPOINT, data, output, progress=False)
  assert open(os.path.join(output, "objects.jsonl")).read() == before
  assert again["splits"]["seen"]["metrics"] == summary["splits"]["seen"]["metrics"]
  with pytest.raises(ValueError, match=r"holds an evaluation with other settings \(config differ"):
    evaluate.evaluate(_config(num_views=2), DEMO_CHECKPOINT, data, output, progress=False)
  # A kill mid-line: the torn row is scored again, the others are kept.
  partial = tmp_path / "partial"
  partial.mkdir()
  for name in ("settings.json",):
    (partial / name).write_text(open(os.path.join(output, name)).read())
  lines = before.splitlines()
  (partial / "objects.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
  evaluate.evaluate(_config(), DEMO_CHECKPOINT, data, str(partial), progress=False)
  resumed = [json.loads(l) for l in open(partial / "objects.jsonl")]
  assert [r["id"] for r in resumed] == [json.loads(l)["id"] for l in lines]


def test_progress_is_a_line_per_split_in_a_log(bench, scored, capsys):
  data, _ = bench
  output, _ = scored
  evaluate.evaluate(_config(), DEMO_CHECKPOINT, data, output)  # resumes: nothing to score
  lines = capsys.readouterr().err.splitlines()
  assert [l.split("|")[0] for l in lines if "object/s" in l or "s/object" in l] == [
      "seen:   0%", "seen: 100%", "unseen:   0%", "unseen: 100%"], lines


def test_novel_cameras_see_the_surface_where_the_record_does(bench):
  """The model-frame cameras and the world transform agree with the record's own cameras."""
  data, _ = bench
  shards = evaluate.find_benchmark(data).splits["seen"]
  import grain  # pylint: disable=g-import-not-at-top
  serialized = grain.sources.ArrayRecordDataSource(list(shards))[1]
  record = records.parse(serialized)
  config = _config(num_views=0)
  config.render.resolution = 0  # the record's own
  obj = evaluate.record_object("seen", serialized, config)
  novel = evaluate.novel_view_indices(record.num_views, 0, 0)
  points = obj.surface[:500].astype(np.float64)
  model_points = (obj.world_transform[:3, :3] @ points.T).T + obj.world_transform[:3, 3]

  def project(c2w, intrinsics, p):
    w2c = np.linalg.inv(c2w)
    q = (w2c[:3, :3] @ p.T).T + w2c[:3, 3]
    fx, fy, cx, cy = intrinsics
    # OpenGL camera: looks down -z, y up; pixel v grows downwards.
    return np.stack([cx + fx * q[:, 0] / -q[:, 2], cy - fy * q[:, 1] / -q[:, 2]], -1)

  for k, v in enumerate(novel):
    world = project(record.c2w[v].astype(np.float64), record.intrinsics[v], points)
    model = project(obj.c2w[k].astype(np.float64), obj.intrinsics[k], model_points)
    np.testing.assert_allclose(model, world, atol=1e-4)
  # The source camera is the canonical one, with the view's intrinsics.
  np.testing.assert_allclose(obj.source_camera[:12], cameras.DEFAULT_SOURCE_CAMERA[:12], atol=1e-5)
  # Ground truth is the stored view on white.
  stored = records.decode_png(record.images[novel[0]]).astype(np.float64) / 255
  expected = stored[..., :3] * stored[..., 3:] + 1 - stored[..., 3:]
  np.testing.assert_allclose(obj.rgb[0], expected, atol=1e-6)
  np.testing.assert_allclose(obj.alpha[0], stored[..., 3], atol=1e-6)


def test_a_perfect_reconstruction_scores_perfectly():
  """The metric path, given the truth as its prediction, and against skimage's PSNR."""
  rng = np.random.default_rng(0)
  truth = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
  noisy = np.clip(truth + 0.05 * rng.normal(size=truth.shape), 0, 1).astype(np.float32)
  got = np.asarray(metrics.psnr(noisy, truth))
  expected = [peak_signal_noise_ratio(t, n, data_range=1.0) for t, n in zip(truth, noisy)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert float(metrics.ssim(truth, truth).min()) == pytest.approx(1.0)


def test_bootstrap_interval_matches_scipy():
  values = np.random.default_rng(1).gamma(2.0, size=60)
  low, high = evaluate.bootstrap_interval(values, 4000, 0.95, seed=0)
  ref = scipy.stats.bootstrap((values,), np.mean, n_resamples=4000, confidence_level=0.95,
                              method="percentile", random_state=0).confidence_interval
  width = ref.high - ref.low
  assert abs(low - ref.low) < 0.05 * width and abs(high - ref.high) < 0.05 * width
  assert evaluate.bootstrap_interval(np.array([3.0]), 100, 0.95, 0) == (3.0, 3.0)


def test_image_sets_get_clip_scores_with_their_prompts(clip_folder, tmp_path):
  folder, _, _ = clip_folder
  images = tmp_path / "images"
  images.mkdir()
  yy, xx = np.mgrid[:64, :64]
  for name, colour in (("red.png", (200, 30, 30, 255)), ("blue.png", (30, 30, 200, 255)),
                       ("plain.png", (30, 200, 30, 255))):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[((yy - 32) ** 2 + (xx - 32) ** 2) < 20 ** 2] = colour
    Image.fromarray(rgba).save(images / name)
  (images / "red.txt").write_text("a red ball\n")
  (images / "prompts.jsonl").write_text(json.dumps({"image": "blue.png", "prompt": "a blue ball"}))
  config = eval_configs.get_config("tiny")
  config.clip.models = folder
  summary = evaluate.evaluate(config, DEMO_CHECKPOINT, str(images), str(tmp_path / "out"),
                              progress=False)
  rows = {r["id"]: r for r in map(json.loads, open(tmp_path / "out" / "objects.jsonl"))}
  assert summary["kind"] == "images" and summary["clip_models"] == ["clip-tiny"]
  assert rows["red.png"]["caption"] == "a red ball" and rows["blue.png"]["caption"] == "a blue ball"
  for row in rows.values():
    assert -1 <= row["clip_image/clip-tiny"] <= 1
  assert "clip_text/clip-tiny" in rows["red.png"] and "clip_text/clip-tiny" not in rows["plain.png"]
  part = summary["splits"]["images"]["metrics"]
  assert part["clip_text/clip-tiny"]["n"] == 2 and part["clip_image/clip-tiny"]["n"] == 3


def test_the_published_benchmark_is_what_the_config_makes():
  """docs/benchmarks/procedural_v1.tsv: the ids, families and captions of the config's
  assets, and the first record of each split regenerated to its published fingerprint."""
  config = benchmark_configs.get_config("procedural_v1")
  rows = make_benchmark.read_list(make_benchmark.published_list("procedural_v1"))
  assert "\t".join(rows[0]) == make_benchmark.HEADER and len(rows) == 201
  splits = make_benchmark.split_configs(config)
  expected = [(split, str(config.families[split]), a.asset_id, a.caption)
              for split, c in splits.items()
              for a in (render_orbits.procedural_asset(c, i) for i in range(c.num_assets))]
  assert [tuple(r[:4]) for r in rows[1:]] == expected
  others = {"seen": {"ellipsoid", "cone", "torus"}, "unseen": {"sphere", "box", "cube", "cylinder"}}
  for split, c in splits.items():
    published = next(r for r in rows if r[0] == split)
    made = make_benchmark.object_row(split, str(config.families[split]),
                                     records.parse(render_orbits.asset_record(c, 0)))
    assert make_benchmark.row_difference(made, published) is None, split
    # The tolerance is far below what a real change of the object moves.
    moved = made[:5] + [" ".join(f"{float(v) + 3 * make_benchmark.FINGERPRINT_ATOL:.5f}"
                                 for v in made[5].split())]
    assert make_benchmark.row_difference(moved, published).startswith("colour ")
    words = {w for r in rows if r[0] == split for w in r[3].split()}
    assert not words & others[split], (split, words & others[split])


def test_command_line_errors_are_one_line(tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, "-m", "vf3d_jax.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
  result = run("--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "out"))
  assert result.returncode == 1
  assert result.stderr == f"error: --data {tmp_path / 'nothing'}: no such file or folder\n"
  (tmp_path / "empty").mkdir()
  result = run("--data", str(tmp_path / "empty"), "--output", str(tmp_path / "out"))
  assert result.stderr == f"error: --data {tmp_path / 'empty'}: no record shards and no images\n"
  result = run("--data", str(tmp_path / "empty"), "--config.eval.confidence=1.5")
  assert result.stderr == "error: eval.confidence must be in (0, 1), got 1.5\n"
  clip = tmp_path / "no-clip"
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(images / "a.png")
  missing = tmp_path / "no.safetensors"
  result = run("--data", str(images), "--output", str(tmp_path / "out"), f"--checkpoint={missing}")
  assert result.stderr == f"error: --checkpoint {missing}: no such file or folder\n"
  result = run("--data", str(images), "--output", str(tmp_path / "out"),
               f"--config.clip.models={clip}")
  assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
  assert str(clip) in result.stderr and "huggingface-cli download" in result.stderr
  assert not (tmp_path / "out").exists()
