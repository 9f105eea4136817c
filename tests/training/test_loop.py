"""The trainers' shared loop: resuming (the config check, the stored schedule, the history,
metrics after a kill), saves of non-finite states, the progress line, matmul precision."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import infer as infer_configs
from configs import lrm as lrm_configs
from configs import video as video_configs
from vf3d_jax.inference import pipeline
from vf3d_jax.training import loop
from vf3d_jax.training import lrm_trainer
from vf3d_jax.training import video_trainer
from vf3d_jax.training import optim
from vf3d_jax.training import sharding
from vf3d_jax.training.metric_writer import MetricWriter, drop_after


def _checkpoint_meta(config):
  """The meta a run of ``config`` stores with its checkpoints."""
  return loop.run_meta(config, loop.Resume(None, int(config.train.steps), "check"))


def _adapter_run():
  """The tiny adapter run of the README: 2400 steps, lr 1e-3, warmup 50, final fraction 0.1."""
  config = video_configs.get_config("tiny")
  return config, _checkpoint_meta(config)


def test_an_unchanged_config_resumes_with_the_stored_schedule():
  config, meta = _adapter_run()
  config.train.log_every = 5  # how often it logs, samples, saves: free to change
  config.train.sample_every = 100
  config.num_devices = 2
  run = loop.resolve_resume(config, 1200, meta)
  assert (run.step, run.decay_steps, run.changed) == (1200, 2400, {})
  # The schedule comes from the checkpoint: a run extended before keeps its decay.
  meta["schedule"]["decay_steps"] = 1000
  assert loop.resolve_resume(config, 1200, meta).decay_steps == 1000
  new = loop.resolve_resume(config, None, None)
  assert (new.step, new.decay_steps) == (None, 2400)


def test_a_changed_config_is_refused_in_one_line_naming_the_fields():
  config, meta = _adapter_run()
  config.train.steps = 4800
  with pytest.raises(ValueError) as error:
    loop.resolve_resume(config, 2400, meta)
  assert str(error.value) == (
      "the config differs from the run in this workdir (checkpoint at step 2400): train.steps "
      "2400 -> 4800; pass --resume=extend to add the steps at the schedule's final learning "
      "rate, or --resume=change to stretch the schedule to the new train.steps (a warm restart)")
  config.train.lr = 2e-3
  config.data.frame_resolution = 64
  with pytest.raises(ValueError) as error:
    loop.resolve_resume(config, 2400, meta)
  assert str(error.value) == (
      "the config differs from the run in this workdir (checkpoint at step 2400): "
      "data.frame_resolution 32 -> 64, train.lr 0.001 -> 0.002, train.steps 2400 -> 4800; "
      "pass --resume=change to continue with the new config, or use a new --workdir")
  with pytest.raises(ValueError, match=r"^--resume=extend changes only train.steps, but the "
                     r"config also differs from the run in this workdir \(checkpoint at step "
                     r"2400\): data.frame_resolution 32 -> 64, train.lr 0.001 -> 0.002; pass "
                     r"--resume=change to take these too$"):
    loop.resolve_resume(config, 2400, meta, "extend")
  with pytest.raises(ValueError, match="^resume must be one of check, extend, change"):
    loop.resolve_resume(config, 2400, meta, "restart")


def test_extend_holds_the_final_learning_rate_and_change_restarts_the_schedule(caplog):
  config, meta = _adapter_run()
  config.train.steps = 4800
  caplog.set_level("WARNING")
  extended = loop.resolve_resume(config, 2400, meta, "extend")
  assert (extended.decay_steps, extended.changed) == (2400, {"train.steps": (2400, 4800)})
  assert caplog.messages[-1] == (
      "extending the run from 2400 to 4800 steps at step 2400: the learning rate keeps its "
      "schedule (now 0.0001, 0.0001 from step 2400 on) and stays 0.0001 until step 4800")
  schedule = optim.learning_rate_schedule(config.train, extended.decay_steps)
  np.testing.assert_allclose([float(schedule(s)) for s in (2400, 3000, 4799)], 1e-4, rtol=1e-5)
  # --resume=change takes the new config: the cosine now ends at 4800, 5.6e-4 at step 2400.
  changed = loop.resolve_resume(config, 2400, meta, "change")
  assert changed.decay_steps == 4800
  assert caplog.messages[-1] == (
      "resuming step 2400 with a changed config (train.steps 2400 -> 4800): the learning-rate "
      "schedule is rebuilt from it (decay over 4800 steps); at step 2400 the learning rate goes "
      "from 0.0001 to 0.000557")
  assert float(optim.learning_rate_schedule(config.train, 4800)(2400)) == pytest.approx(5.574e-4,
                                                                                         rel=1e-3)
  config.train.steps = 1200
  with pytest.raises(ValueError, match="^--resume=extend needs more train.steps than the run's "
                     "2400, got 1200; pass --resume=change to shorten the run$"):
    loop.resolve_resume(config, 2400, meta, "extend")


def test_the_architecture_cannot_change_even_when_asked():
  config = lrm_configs.get_config("tiny")
  meta = _checkpoint_meta(config)
  config.model.layers = 3
  with pytest.raises(ValueError, match=r"^the model cannot change on resume \(model.layers 2 -> "
                     r"3\): its checkpoint holds the old architecture; start a new --workdir "
                     r"from its weights instead$"):
    loop.resolve_resume(config, 10, meta, "change")


def test_the_checkpoint_stores_the_config_architecture_and_schedule():
  config = lrm_configs.get_config("tiny")
  meta = _checkpoint_meta(config)
  assert meta["config"]["model"]["layers"] == 2 and meta["config"]["train"]["steps"] == 600
  assert meta["schedule"] == {"kind": "warmup_cosine", "lr": config.train.lr,
                              "warmup_steps": config.train.warmup_steps, "decay_steps": 600,
                              "final_lr_fraction": 0.1}
  json.dumps(meta)  # the checkpoint's JSON item


def test_every_start_is_recorded_with_its_provenance(tmp_path):
  config = lrm_configs.get_config("tiny")
  mesh = sharding.make_mesh(2)
  loop.record_start(str(tmp_path), config, loop.Resume(None, 600, "check"), mesh)
  config.train.steps = 900
  loop.record_start(str(tmp_path), config,
                    loop.Resume(600, 600, "extend", {"train.steps": (600, 900)}), mesh)
  history = [json.loads(l) for l in open(tmp_path / "config_history.jsonl")]
  assert [(h["start_step"], h["resume"], h["changed"]) for h in history] == [
      (0, "check", {}), (600, "extend", {"train.steps": [600, 900]})]
  assert [h["config"]["train"]["steps"] for h in history] == [600, 900]
  assert history[1]["schedule"]["decay_steps"] == 600
  found = history[1]["provenance"]
  assert found["packages"]["jax"] == jax.__version__
  assert (found["device_kind"], found["platform"], found["devices"], found["processes"]) == (
      "cpu", "cpu", 2, 1)
  assert found["git_commit"] is None or len(found["git_commit"]) == 40
  assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 900


def test_a_resumed_run_drops_the_metrics_it_logged_after_its_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 0, "eval/psnr": 9.0}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
  path.write_text("".join(json.dumps(l) + "\n" for l in lines) + '{"step": 6, "lo')  # cut by a kill
  writer = MetricWriter(str(tmp_path), resume_step=3)
  writer.write_scalars(4, {"loss": 0.5})
  writer.close()
  logged = [json.loads(l) for l in open(path)]
  assert [(l["step"], l.get("loss")) for l in logged] == [
      (0, None), (1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]
  assert drop_after(str(path), 10) == 0 and drop_after(str(tmp_path / "none.jsonl"), 0) == 0


def test_a_non_finite_state_is_never_saved(tmp_path):
  config = lrm_configs.get_config("tiny")
  checkpointer = loop.Checkpointer(str(tmp_path), config)
  state = loop.TrainState(jnp.array(1), {"w": jnp.ones((2, 3))}, {"mu": jnp.zeros(3)})
  iterator = iter([])  # no data state: saved as such
  assert bool(loop.all_finite(state))
  bad = state.replace(opt_state={"mu": jnp.array([0.0, jnp.inf, 0.0])})
  with pytest.raises(loop.TrainingDiverged, match=r"^the train state at step 1 is not finite, so "
                     r"it was not saved \(none saved\); lower train.lr"):
    checkpointer.save(1, bad, iterator, {}, force=True)
  assert checkpointer.latest_step() is None and not os.listdir(tmp_path / "checkpoints")
  del iterator
  checkpointer.close()


def test_progress_line_suits_logs():
  assert loop.progress(120, 2400, 1.834) == "step 120/2400 (5%), 1.83 steps/s, ETA 20m43s"
  assert loop.progress(2400, 2400, 2.0) == "step 2400/2400 (100%), 2 steps/s, ETA 0s"
  assert loop.progress(1, 100_000, 10.0).endswith("ETA 2h46m40s")
  assert loop.progress(0, 10, 0.0).endswith("ETA ?")


@pytest.fixture
def no_default_precision():
  """The library's own precision, without the suite's global "highest" (tests/conftest.py)."""
  before = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", None)
  yield
  jax.config.update("jax_default_matmul_precision", before)


def test_matmul_precision_setting(no_default_precision):
  config = lrm_configs.get_config("tiny")
  assert config.precision == "highest"
  with loop.matmul_precision(config):
    jaxpr = str(jax.make_jaxpr(jnp.dot)(jnp.ones((2, 2)), jnp.ones((2, 2))))
  assert "Precision.HIGHEST" in jaxpr
  config.precision = "fast"
  with pytest.raises(ValueError, match="^precision must be one of default, high, highest, "
                     "got 'fast'$"):
    loop.matmul_precision(config)


@pytest.mark.parametrize("module, config, expected", [
    (lrm_trainer, lrm_configs.get_config("tiny"), "highest"),
    (video_trainer, video_configs.get_config("tiny"), "highest"),
    (video_trainer, video_configs.get_config("sd15"), "default"),
    (pipeline, infer_configs.get_config("vfusion3d"), "highest"),
    (pipeline, infer_configs.get_config("fast"), "default")])
def test_jobs_run_at_their_config_precision(no_default_precision, monkeypatch, module, config,
                                            expected):
  """Float32 jobs at "highest" (no TF32 or bfloat16 passes on GPUs and TPUs); the bfloat16
  variants (sd15, fast) as before."""
  seen = []
  monkeypatch.setattr(module, "_run" if module is pipeline else "_train",
                      lambda *args: seen.append(jax.config.jax_default_matmul_precision))
  if module is pipeline:
    module.run(config, "model.safetensors", "photo.png", "out")
  else:
    module.train_and_evaluate(config, "workdir")
  assert seen == [expected] and jax.config.jax_default_matmul_precision is None
