"""The LRM training job: multi-stage steps, checkpoints, exact resume after SIGKILL, user errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import lrm as lrm_configs
from configs import render as render_configs
from vf3d_jax import pretrained
from vf3d_jax.data import render_orbits
from vf3d_jax.training import lrm_trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = "((3, 16, 16, 8, 8), (3, 24, 16, 8, 8))"
OVERRIDES = ["--config.train.steps=6", f"--config.train.stages={STAGES}",
             "--config.train.batch_size=2", "--config.train.num_views=2",
             "--config.train.log_every=1", "--config.train.checkpoint_every=2",
             "--config.train.eval_every=1000", "--config.eval.render_resolution=16",
             "--config.eval.num_coarse=8", "--config.eval.num_fine=8", "--config.eval.num_objects=2",
             "--config.num_devices=2", "--config.data.num_workers=2"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  root = tmp_path_factory.mktemp("records")
  paths = {}
  for name, seed, count in (("train", 0, 6), ("eval", 7, 2)):
    config = render_configs.get_config("tiny")
    config.output_dir, config.name, config.seed, config.num_assets = str(root), name, seed, count
    config.resolution = 32
    paths[name] = render_orbits.render_dataset(config)
  return paths


def _command(workdir, records, extra=()):
  return [sys.executable, "-m", "vf3d_jax.train_lrm", "--config", "configs/lrm.py:tiny",
          "--workdir", str(workdir), f"--config.data.train={records['train']}",
          f"--config.data.eval={records['eval']}", *OVERRIDES, *extra]


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)["params"]


def _steps(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(records, tmp_path):
  """2 devices, 2 Grain worker processes: killed after a checkpoint, resumed, the same run."""
  straight = tmp_path / "straight"
  done = subprocess.run(_command(straight, records), cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  progress = r"step 6/6 \(100%\), [0-9.]+ steps/s, ETA 0s: "  # the log line's head
  assert re.search(progress, done.stderr), done.stderr[-3000:]
  logged = [m for m in _steps(straight) if "loss" in m]
  assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
  assert [m["stage"] for m in logged] == [0, 0, 0, 1, 1, 1]  # switched without a restart
  for m in logged:
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["lr"] >= 0
    assert {"loss/mse", "loss/opacity", "param_norm", "update_norm", "objects_per_s"} <= set(m)
  assert logged[-1]["lr"] > 0  # warmup starts at 0
  assert os.listdir(straight / "images") and os.listdir(straight / "tensorboard")

  killed = tmp_path / "killed"
  # Its own process group: the kill takes its Grain workers too, as a lost machine would.
  proc = subprocess.Popen(_command(killed, records), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.time() + 300
  while not (killed / "checkpoints" / "2").exists() and time.time() < deadline:
    if proc.poll() is not None:
      break
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  steps_before = sorted(int(s) for s in os.listdir(killed / "checkpoints") if s.isdigit())
  assert steps_before and max(steps_before) < 6, steps_before
  resumed = subprocess.run(_command(killed, records), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stderr
  a, b = _params(straight, 6), _params(killed, 6)
  assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b))
  # Nothing logged twice: the steps after the checkpoint the killed run had logged were dropped.
  assert [m["step"] for m in _steps(killed) if "loss" in m] == [1, 2, 3, 4, 5, 6]
  history = [json.loads(l) for l in open(killed / "config_history.jsonl")]
  assert [h["start_step"] for h in history] == [0, max(steps_before)]

  # A changed config does not resume behind the user's back.
  changed = subprocess.run(_command(straight, records, ["--config.train.steps=8"]), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
  assert (changed.returncode, changed.stderr) == (1, (
      "error: the config differs from the run in this workdir (checkpoint at step 6): "
      "train.steps 6 -> 8; pass --resume=extend to add the steps at the schedule's final "
      "learning rate, or --resume=change to stretch the schedule to the new train.steps (a warm "
      "restart)\n"))

  # The trained parameters export to the released layout and load for inference (the workdir
  # given relative to the current folder, as tools/reproduce_toy.sh gives it).
  exported = tmp_path / "model.safetensors"
  out = subprocess.run([sys.executable, "-m", "tools.export_lrm", "--workdir", "straight",
                        "--output", str(exported)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": REPO})
  assert out.returncode == 0, out.stderr[-2000:]
  _, loaded = pretrained.load_lrm(exported)
  assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), a, loaded))


@pytest.mark.parametrize("module", ["vf3d_jax.train_lrm", "vf3d_jax.train_video"])
def test_mistakes_before_a_run_starts_are_one_line_and_leave_no_workdir(module, tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  empty = tmp_path / "empty"
  empty.mkdir()
  for args, stderr in [
      ([f"--workdir={afile}"], f"error: --workdir {afile} is not a directory\n"),
      ([f"--workdir={tmp_path / 'run'}", "--config.data.train="],
       "error: data.train is empty: give record folders as 'path[:weight],...' (make them with "
       "`python -m tools.render_orbits`)\n"),
      ([f"--workdir={tmp_path / 'run'}", f"--config.data.train={empty}"],
       f"error: data.train: no ArrayRecord shards at '{empty}'\n")]:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert (done.returncode, done.stderr) == (1, stderr)
  assert sorted(os.listdir(tmp_path)) == ["afile", "empty"]


def test_divergence_stops_with_a_clear_message(records, tmp_path):
  config = lrm_configs.get_config("tiny")
  config.data.train, config.data.eval = records["train"], ""
  config.train.steps, config.train.stages = 3, ((3, 16, 16, 8, 8),)
  config.train.batch_size, config.train.num_views, config.train.log_every = 2, 2, 1
  config.train.lr, config.train.warmup_steps, config.train.grad_clip = 1e30, 1, 0.0
  config.num_devices = 1
  with pytest.raises(lrm_trainer.TrainingDiverged, match="non-finite values at step"):
    lrm_trainer.train_and_evaluate(config, str(tmp_path / "nan"))


@pytest.mark.slow
def test_lpips_loss_term_runs_sharded_over_devices(records, tmp_path):
  config = lrm_configs.get_config("tiny")
  config.data.train, config.data.eval = records["train"], ""
  config.train.steps, config.train.stages = 1, ((1, 16, 16, 8, 8),)
  config.train.batch_size, config.train.num_views, config.train.log_every = 4, 2, 1
  config.loss.lpips, config.loss.lpips_weights, config.loss.mse = 1.0, "random:0", 0.0
  config.train.fsdp = True  # 4 simulated devices: parameters split, objects split
  state = lrm_trainer.train_and_evaluate(config, str(tmp_path / "lpips"))
  assert int(state.step) == 1
  metrics = _steps(tmp_path / "lpips")[-1]
  assert metrics["loss/lpips"] > 0 and "loss/mse" not in metrics


def test_the_fast_render_mode_trains(records, tmp_path):
  """Supervision rendered in the fast mode: an occupancy grid of each object's current field
  (under vmap the skipped chunks become selects), gradients through the occupied samples."""
  config = lrm_configs.get_config("tiny")
  config.data.train, config.data.eval = records["train"], ""
  config.train.steps, config.train.stages = 3, ((3, 16, 16, 8, 8),)
  config.train.batch_size, config.train.num_views, config.train.log_every = 2, 2, 1
  config.train.render_mode = "fast"
  config.num_devices = 2
  state = lrm_trainer.train_and_evaluate(config, str(tmp_path / "fast"))
  assert int(state.step) == 3
  steps = _steps(tmp_path / "fast")
  assert len(steps) == 3 and all(np.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)
  assert steps[-1]["loss"] != steps[0]["loss"]
