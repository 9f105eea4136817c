"""The data engine on tiny models: stages, determinism, process split, resume, records."""

import json
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

from configs import engine as engine_configs
from configs import render as render_configs
from configs import video as video_configs
from vf3d_jax.data import pipeline as data_pipeline
from vf3d_jax.data import records
from vf3d_jax.data import render_orbits
from vf3d_jax.data import views as views_lib
from vf3d_jax.engine import engine
from vf3d_jax.engine import features
from vf3d_jax.video import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMES, SIZE = 8, 16


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
  """A random tiny video model export (8 frames of 16²) and a 3D orbit dataset."""
  config = video_configs.get_config("tiny")
  config.model.update(block_out_channels=(16, 32), attention_levels=(False, True),
                      attention_heads=2, cross_attention_dim=32, norm_num_groups=8, motion_heads=2)
  config.text.width = 32
  config.data.frame_resolution, config.data.num_frames = SIZE, FRAMES
  spec = model_lib.spec_from_config(config)
  model = model_lib.VideoModel(spec)
  root = tmp_path_factory.mktemp("engine_models")
  # Random weights drawn on the host (no compiled init): the stages only need some video model.
  params = features.random_params(model.param_shapes(), 0)
  export = model_lib.save_export(str(root / "video"), spec, params)
  render = render_configs.get_config("tiny")
  render.output_dir, render.name, render.num_assets = str(root), "orbits", 12
  render.views.num_orbit_views, render.views.num_random_views = FRAMES, 0
  render.progress = False
  return export, render_orbits.render_dataset(render)


def _config(video_model, **overrides):
  export, orbits = video_model
  config = engine_configs.get_config("tiny")
  config.shard_size = 3
  config.prompts.procedural.num_assets = 8
  config.prompts.procedural.views.num_orbit_views = FRAMES
  config.video.model = export
  config.video.num_steps = 2
  config.video.batch_size = 2
  config.features.input_size = 16
  config.elevation.train = orbits
  config.elevation.steps = 50
  config.records.matting = "none"
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _command_line(video_model):
  """``_config``'s settings as data_engine flags."""
  export, orbits = video_model
  return ["--config", "configs/engine.py:tiny", "--config.shard_size=3",
          "--config.prompts.procedural.num_assets=8",
          f"--config.prompts.procedural.views.num_orbit_views={FRAMES}",
          f"--config.video.model={export}", "--config.video.num_steps=2",
          "--config.video.batch_size=2", "--config.features.input_size=16",
          f"--config.elevation.train={orbits}", "--config.elevation.steps=50",
          "--config.records.matting=none"]


def _labels(tmp_path, workdir):
  """Planted hand labels: every other video good."""
  rows = engine.read_prompts(engine.Workdir(workdir))
  path = tmp_path / "labels.csv"
  path.write_text("video_id,label\n" + "".join(
      f"{r['id']},{'good' if i % 2 else 'bad'}\n" for i, r in enumerate(rows)))
  return str(path)


def test_prompts_are_deduplicated_with_stable_ids(tmp_path):
  text = tmp_path / "prompts.txt"
  text.write_text("a red chair\n\n  a red   chair \nA RED CHAIR\na blue cone\n")
  jsonl = tmp_path / "prompts.jsonl"
  jsonl.write_text(json.dumps({"prompt": "a blue cone"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
  config = engine_configs.get_config("tiny")
  config.prompts.source, config.prompts.file = "file", str(text)
  rows = engine.make_prompts(config)
  assert [r["prompt"] for r in rows] == ["a red chair", "a blue cone"]
  assert rows[0]["id"] == engine.prompt_id("a  red chair ") == engine.prompt_id("a red chair")
  config.prompts.file = str(jsonl)
  assert [r["id"] for r in engine.make_prompts(config)][0] == rows[1]["id"]
  jsonl.write_text('{"text": "no"}\n')
  with pytest.raises(ValueError, match=r"prompts.jsonl line 1: want"):
    engine.make_prompts(config)


def test_process_split_has_no_overlap_and_no_gap():
  for count in (1, 5, 12):
    for processes in (1, 2, 3):
      parts = [engine.my_shards(count, p, processes) for p in range(processes)]
      flat = sorted(s for part in parts for s in part)
      assert flat == list(range(count))


def test_end_to_end_and_records_load_with_their_cameras(video_model, tmp_path):
  workdir = str(tmp_path / "run")
  config = _config(video_model)
  engine.run(config, workdir, ["prompts"], progress=False)
  # Labels that are all good stop the filter; a fit that never finished may change its inputs.
  all_good = tmp_path / "all_good.csv"
  all_good.write_text("".join(f"{r['id']},good\n"
                              for r in engine.read_prompts(engine.Workdir(workdir))))
  config.labels.source = str(all_good)
  with pytest.raises(ValueError, match=r"all 8 labelled videos are good; the filter needs both"):
    engine.run(config, workdir, progress=False)
  config.labels.source = _labels(tmp_path, workdir)
  reports = engine.run(config, workdir, progress=False)
  assert reports["prompts"]["prompts"] == 8 and reports["videos"]["shards"] == 0  # done above
  assert reports["filter"]["labelled"] == 8 and "cv" in reports["filter"]
  assert reports["elevation"]["val_mae_deg"] is not None
  index = reports["index"]
  kept = reports["filter"]["kept"]
  assert index["records"] == kept > 0
  for name in ("sheet.png", "histograms.png", "summary.json"):
    assert os.path.isfile(os.path.join(workdir, "report", name))
  # The records: synthetic, scored, annotated, with 8 orbit cameras at the estimated elevation.
  shards = data_pipeline.find_shards(os.path.join(workdir, "records"))
  source = grain.sources.ArrayRecordDataSource(shards)
  record = records.parse(source[0])
  assert record.source == "synthetic" and record.num_views == record.num_orbit_views == FRAMES
  assert np.isfinite(record.quality) and record.quality >= config.filter.threshold
  expected = engine.synthetic_cameras(config, FRAMES, record.elevation_estimate)
  np.testing.assert_allclose(record.c2w, expected["c2w"], atol=1e-6)
  np.testing.assert_allclose(record.elevation, record.elevation_estimate, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(record.c2w[:, :3, 3], axis=-1), 2.4, rtol=1e-5)
  # The LRM loader reads them, mixed with 3D data, and puts the source at the canonical camera.
  data = {"datasets": [{"path": os.path.join(workdir, "records"), "weight": 1.0},
                       {"path": video_model[1], "weight": 0.2}]}
  cfg = data_pipeline.default_config()
  cfg.update(datasets=data["datasets"], batch_size=2, num_render_views=2, input_resolution=16,
             render_resolution=16, crop_size=16, num_workers=0, source_view=0,
             expected_views=0)
  batch = next(iter(data_pipeline.make_dataset(cfg)))
  assert batch["render_rgb"].shape == (2, 2, 16, 16, 3)
  c2w, _, _ = views_lib.canonicalize_cameras(record.c2w, 0, 1.0)
  np.testing.assert_allclose(c2w[0], views_lib.canonical_c2w(), atol=1e-5)
  # A rerun redoes nothing; other settings are refused.
  again = engine.run(config, workdir, progress=False)
  assert again["videos"]["shards"] == 0 and again["records"]["shards"] == 0
  with pytest.raises(ValueError, match=r"the videos stage ran with other inputs \(video"):
    engine.run(_config(video_model, **{"video.num_steps": 3}), workdir, ["videos"], progress=False)


def test_videos_do_not_depend_on_the_process_split(video_model, tmp_path):
  config = _config(video_model)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  engine.run(config, one, ["prompts", "frames", "videos"], progress=False)
  engine.run(config, two, ["prompts"], progress=False)
  for process in (0, 1):  # two processes sharing a workdir, one after the other
    engine.run(config, two, ["frames", "videos"], progress=False, process_index=process,
               process_count=2)
  for shard in range(3):
    a = engine.load_npz(engine.Workdir(one).shard("videos", shard))
    b = engine.load_npz(engine.Workdir(two).shard("videos", shard))
    np.testing.assert_array_equal(a["videos"], b["videos"])
    np.testing.assert_array_equal(a["ids"], b["ids"])


def test_the_automatic_labeller_passes_true_orbits_and_fails_static_ones(video_model, tmp_path):
  config = _config(video_model)
  workdir = str(tmp_path / "labels")
  engine.run(config, workdir, ["prompts"], progress=False)
  rows = engine.read_prompts(engine.Workdir(workdir))[:3]
  truth = engine._on_white(engine.true_orbits(config, [r["asset"] for r in rows]))
  truth = np.stack([engine._resize_float(t, SIZE) for t in truth])
  static = np.repeat(truth[:, :1], FRAMES, axis=1)
  work = engine.Workdir(workdir)
  config.labels.min_iou = 0.95
  scores = {}
  for name, videos in (("true", truth), ("static", static)):
    engine.save_npz(work.shard("videos", 0), videos=engine._to_uint8(videos))
    scores[name] = engine.stage_labels(config, engine.Models(config), rows, 0, work)
  assert scores["true"]["good"].all() and np.all(scores["true"]["iou"] > 0.95), scores
  assert not scores["static"]["good"].all(), scores
  # A static clip of a turning object fails; of a round one (a sphere, an upright cylinder)
  # it cannot: silhouettes do not see rotation about the axis.
  assert np.mean(scores["static"]["iou"]) < np.mean(scores["true"]["iou"]), scores


def _assert_videos_equal_a_straight_run(config, workdir: str, reference: str):
  """Every video shard of ``workdir`` equals one process's uninterrupted run in ``reference``."""
  engine.run(config, reference, ["prompts", "frames", "videos"], progress=False)
  for shard in range(3):
    np.testing.assert_array_equal(
        engine.load_npz(engine.Workdir(workdir).shard("videos", shard))["videos"],
        engine.load_npz(engine.Workdir(reference).shard("videos", shard))["videos"])


@pytest.mark.slow
def test_a_killed_stage_resumes_without_redoing_shards(video_model, tmp_path):
  config = _config(video_model)
  workdir = tmp_path / "killed"
  engine.run(config, str(workdir), ["prompts", "frames"], progress=False)
  args = [sys.executable, "-m", "vf3d_jax.data_engine", f"--workdir={workdir}", "--stage=videos",
          *_command_line(video_model)]
  process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  first = engine.Workdir(str(workdir)).shard("videos", 0)
  deadline = time.time() + 300
  while not os.path.isfile(first) and time.time() < deadline and process.poll() is None:
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert os.path.isfile(first), process.stderr.read().decode()[-2000:]
  stamp = os.stat(first).st_mtime_ns
  report = engine.run(config, str(workdir), ["videos"], progress=False)
  assert report["videos"]["shards"] < 3 and os.stat(first).st_mtime_ns == stamp
  _assert_videos_equal_a_straight_run(config, str(workdir), str(tmp_path / "straight"))


def test_first_frames_from_the_image_model_or_the_users_images(video_model, tmp_path):
  export, _ = video_model
  config = _config(video_model, **{"frames.source": "model", "frames.model": export})
  rows = [{"id": engine.prompt_id(p), "prompt": p} for p in ("a red cube", "a blue cone")]
  models = engine.Models(config)
  frames = engine.stage_frames(config, models, rows, 0)["frames"]
  assert frames.shape == (2, SIZE, SIZE, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(frames, engine.stage_frames(config, models, rows, 0)["frames"])
  assert not np.array_equal(frames, engine.stage_frames(config, models, rows, 1)["frames"])
  folder = tmp_path / "images"
  folder.mkdir()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(folder / f"{rows[0]['id']}.png")
  config = _config(video_model, **{"frames.source": "images", "frames.images": str(folder)})
  with pytest.raises(FileNotFoundError, match=rf"no image for prompt {rows[1]['id']}"):
    engine.stage_frames(config, engine.Models(config), rows, 0)
  out = engine.stage_frames(config, engine.Models(config), rows[:1], 0)["frames"]
  np.testing.assert_allclose(out[0].mean(axis=(0, 1)), (200, 30, 30), atol=2)


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_split_the_shards_and_equal_one(video_model, tmp_path):
  """``--distributed``: 2 processes on this machine share the shards, with no overlap and no gap."""
  config = _config(video_model)
  workdir = tmp_path / "two"
  args = [f"--workdir={workdir}", "--stage=prompts,frames,videos", *_command_line(video_model)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "vf3d_jax.data_engine", *args, "--distributed",
       f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  reports = [json.loads(out[out.index("{"):]) for out, _ in outputs]
  # Shards 0 and 2 on process 0, shard 1 on process 1.
  assert [r["videos"]["shards"] for r in reports] == [2, 1]
  _assert_videos_equal_a_straight_run(config, str(workdir), str(tmp_path / "one"))
