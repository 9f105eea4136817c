"""The video training job: both stages, adapters-only training, resume, export, sampling."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import render as render_configs
from configs import video as video_configs
from vf3d_jax.data import render_orbits
from vf3d_jax.training import sharding
from vf3d_jax.training import video_trainer
from vf3d_jax.video import sampling
from vf3d_jax.video import model as model_lib
from vf3d_jax.weights.rules import flat

FRAMES, SIZE = 4, 16
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Session scope: xdist may interleave other modules' tests, which would tear a
# module-scoped fixture down and train it again.
@pytest.fixture(scope="session")
def records(tmp_path_factory):
  root = tmp_path_factory.mktemp("orbits")
  paths = {}
  for name, seed, count in (("train", 0, 4), ("eval", 7, 2)):
    config = render_configs.get_config("tiny")  # 8 orbit views
    config.output_dir, config.name, config.seed, config.num_assets = str(root), name, seed, count
    config.resolution = 32
    paths[name] = render_orbits.render_dataset(config)
  return paths


def _config(stage: str, records, **train):
  config = video_configs.get_config("tiny_image" if stage == "image" else "tiny")
  config.model.update(block_out_channels=(8, 16), attention_levels=(False, True),
                      attention_heads=2, cross_attention_dim=16, norm_num_groups=4,
                      motion_heads=2)
  config.text.update(width=16, vocab_size=64, max_length=8)
  config.data.update(train=records["train"], eval=records["eval"], num_frames=FRAMES,
                     frame_resolution=SIZE, num_workers=0)
  config.train.update(steps=2, batch_size=2, log_every=1, checkpoint_every=1, sample_every=2,
                      warmup_steps=1)
  config.train.update(**train)
  config.sample.update(num_steps=2, num_videos=2)
  config.num_devices = 1
  return config


@pytest.fixture(scope="session")
def image_run(records, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("image"))
  config = _config("image", records)
  config.num_devices = 2  # data parallel: one clip per (simulated) device
  video_trainer.train_and_evaluate(config, workdir)
  return workdir


def test_image_stage_trains_exports_and_writes_samples(image_run):
  lines = [json.loads(l) for l in open(os.path.join(image_run, "metrics.jsonl"))]
  assert [l["step"] for l in lines if "loss" in l] == [1, 2]
  assert all(np.isfinite(l["loss"]) for l in lines if "loss" in l)
  assert any("sample/seconds_per_clip" in l for l in lines)
  assert os.listdir(os.path.join(image_run, "images"))
  model, params = model_lib.load_export(os.path.join(image_run, "export"))
  assert set(params) == {"unet", "text"}
  assert not model.spec.unet.motion_modules


class _StopAfter:
  """Stands for ``loop.Preemption``: a SIGTERM arriving during step ``step``."""

  def __init__(self, step: int):
    self.step, self.requested = step, False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass

  def reached(self, step: int) -> bool:
    self.requested = step >= self.step
    return self.requested


@pytest.mark.slow
def test_video_stage_trains_only_the_adapters_and_resumes(records, image_run, tmp_path,
                                                          monkeypatch):
  config = _config("video", records)
  config.init.unet = os.path.join(image_run, "export")
  model = model_lib.VideoModel(model_lib.spec_from_config(config))
  start = flat(model_lib.initial_params(model, jax.random.key(config.seed),
                                        unet=config.init.unet))
  image = flat(model_lib.load_export(config.init.unet)[1])
  workdir = str(tmp_path / "video")
  config.train.sample_every = 0  # sampling is covered by the image stage and the CLI below
  config.train.ema_decay = 0.9  # the export is the adapters' moving average
  with monkeypatch.context() as patch:
    patch.setattr(video_trainer.loop, "Preemption", lambda: _StopAfter(1))
    video_trainer.train_and_evaluate(config, workdir)  # saves step 1 and stops
  assert not os.path.exists(os.path.join(workdir, "export"))
  state = video_trainer.train_and_evaluate(config, workdir)  # resumes from step 1
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))
           if "loss" in json.loads(l)]
  assert steps == [1, 2]
  _, trained = model_lib.load_export(os.path.join(workdir, "export"))
  trained = flat(trained)
  assert trained.keys() == start.keys()
  adapters = [p for p in trained if video_trainer.optim.is_trained(config.train, p)]
  assert adapters and all("temporal_conv" in p or "motion_modules" in p or "conv_in_cond" in p
                          for p in adapters)
  for path, value in trained.items():
    if path in adapters:
      continue
    # Frozen: bit-identical to the image stage's export.
    np.testing.assert_array_equal(value, image[path], err_msg=path)
  moved = [p for p in adapters if not np.array_equal(trained[p], start[p])]
  assert len(moved) > len(adapters) // 2
  ema, last = flat(video_trainer.optim.ema_params(state.opt_state)), flat(state.params)
  assert sorted(ema) == sorted(adapters)
  for path in adapters:
    np.testing.assert_array_equal(trained[path], ema[path], err_msg=path)
  assert any(not np.array_equal(ema[p], last[p]) for p in adapters)

  # The same run without the interruption gives the same adapters (and average).
  straight = str(tmp_path / "straight")
  video_trainer.train_and_evaluate(config, straight)
  _, again = model_lib.load_export(os.path.join(straight, "export"))
  for path, value in flat(again).items():
    np.testing.assert_array_equal(value, trained[path], err_msg=path)

  # sample_video on the export: a folder per image with frames and an mp4.
  out = str(tmp_path / "samples")
  sample_config = video_configs.get_config("tiny")
  sample_config.sample.update(num_steps=2)
  folders = sampling.sample_to_folder(sample_config, model_path=workdir, output=out,
                                      prompts=["a red sphere", "a cube"])
  assert [os.path.basename(f) for f in folders] == ["prompt_00", "prompt_01"]
  assert sorted(os.listdir(folders[0])) == [f"frame_{i:02d}.png" for i in range(FRAMES)] + [
      "orbit.mp4"]
  # From first frames: an RGBA image and an opaque one, each starting an orbit.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  images.mkdir()
  Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(images / "cutout.png")
  Image.new("RGB", (24, 24), (0, 0, 255)).save(images / "photo.jpg")
  folders = sampling.sample_to_folder(sample_config, model_path=os.path.join(workdir, "export"),
                                      output=out, prompts=["a red sphere"], image=str(images))
  assert [os.path.basename(f) for f in folders] == ["cutout", "photo"]
  first = np.asarray(Image.open(os.path.join(folders[1], "input.png")))
  assert first.shape == (SIZE, SIZE, 3) and (first[..., 2] >= 250).all()  # JPEG
  assert (first[..., :2] < 10).all()  # blue, not white
  assert np.asarray(Image.open(os.path.join(folders[0], "input.png"))).min() == 255  # on white
  with pytest.raises(FileNotFoundError, match="not an exported video model"):
    sampling.sample_to_folder(sample_config, model_path=str(tmp_path), output=out, prompts=["x"])


def test_first_frame_keeps_an_opaque_images_colours(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new("RGB", (24, 20), (0, 0, 255)).save(tmp_path / "blue.png")
  first = sampling.first_frame(str(tmp_path / "blue.png"), SIZE, 0.0)  # the default ratio
  assert first.shape == (SIZE, SIZE, 3) and first.dtype == np.float32
  np.testing.assert_allclose(first, np.broadcast_to([0, 0, 1], first.shape), atol=1 / 255)
  Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "clear.png")
  np.testing.assert_array_equal(sampling.first_frame(str(tmp_path / "clear.png"), SIZE, 0.0), 1.0)


def _zero_export(stage: str, directory) -> str:
  """A tiny video model of ``stage`` with all-zero parameters, exported (no training)."""
  spec = model_lib.spec_from_config(_config(stage, {"train": "", "eval": ""}))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model_lib.param_shapes(spec))
  return model_lib.save_export(str(directory / "export"), spec, params)


@pytest.fixture(scope="session")
def video_export(tmp_path_factory):
  """A tiny video model with first-frame conditioning (``condition_channels > 0``)."""
  return _zero_export("video", tmp_path_factory.mktemp("video_export"))


def _sample_config(**sample):
  config = video_configs.get_config("tiny")
  config.sample.update(num_steps=1, **sample)
  return config


def test_sample_video_gives_images_with_one_stem_their_own_folders(video_export, tmp_path,
                                                                   monkeypatch, capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  images.mkdir()
  Image.new("RGB", (24, 24), (0, 0, 255)).save(images / "obj.png")
  Image.new("RGB", (24, 24), (255, 0, 0)).save(images / "obj.jpg", quality=95)
  out = tmp_path / "out"
  folders = sampling.sample_to_folder(_sample_config(), model_path=video_export, output=str(out),
                                      prompts=["a cube"], image=str(images), progress=True)
  assert folders == [str(out / "obj_jpg"), str(out / "obj_png")]
  assert sorted(os.listdir(out)) == ["obj_jpg", "obj_png"]  # no temporary folder left
  for folder, colour in zip(folders, ([255, 0, 0], [0, 0, 255])):
    assert sorted(os.listdir(folder)) == ["frame_00.png", "frame_01.png", "frame_02.png",
                                          "frame_03.png", "input.png", "orbit.mp4"]
    first = np.asarray(Image.open(os.path.join(folder, "input.png"))).astype(int)
    assert np.abs(first - colour).max() < 10
  captured = capsys.readouterr()
  assert "videos: 100%" in captured.err and "2/2" in captured.err
  assert f"obj_png: 'a cube' -> {out / 'obj_png'}" in captured.out

  def full_disk(frames, path, fps):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(sampling, "write_video", full_disk)
  with pytest.raises(OSError, match="No space left"):
    sampling.sample_to_folder(_sample_config(), model_path=video_export, output=str(out),
                              prompts=["a cube"], image=str(images))
  assert sorted(os.listdir(out)) == ["obj_jpg", "obj_png"]  # the complete ones are kept
  assert sorted(os.listdir(out / "obj_jpg"))[-1] == "orbit.mp4"


def test_sample_video_checks_everything_before_loading_the_model(video_export, tmp_path,
                                                                 monkeypatch):
  image_model = _zero_export("image", tmp_path / "image")  # no first-frame conditioning

  def no_load(*args, **kwargs):
    raise AssertionError("the model was loaded")

  monkeypatch.setattr(model_lib, "load_export", no_load)
  out = str(tmp_path / "out")
  sample = lambda config=None, **kw: sampling.sample_to_folder(
      config or _sample_config(), **{"model_path": video_export, "output": out,
                                     "prompts": ["x"], **kw})
  with pytest.raises(FileNotFoundError, match="not an exported video model"):
    sample(model_path=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="nope.png: no such file or folder"):
    sample(image=str(tmp_path / "nope.png"))
  with pytest.raises(ValueError, match="give at least one --prompt or an --image"):
    sample(prompts=[])
  (tmp_path / "red.png").write_bytes(b"")
  with pytest.raises(ValueError, match="no first-frame conditioning"):
    sample(model_path=image_model, image=str(tmp_path / "red.png"))
  with pytest.raises(ValueError, match=r"^sample.fps must be a number >= 1, got 0$"):
    sample(_sample_config(fps=0))
  with pytest.raises(ValueError, match="sampler must be one of"):
    sample(_sample_config(sampler="euler"))
  (tmp_path / "file").write_text("")
  with pytest.raises(NotADirectoryError, match="a file is in the way"):
    sample(output=str(tmp_path / "file"))
  assert not os.path.exists(out)


def test_sample_video_cli_reports_a_bad_output_in_one_line(video_export, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  (tmp_path / "file").write_text("")
  done = subprocess.run(
      [sys.executable, "-m", "vf3d_jax.sample_video", "--model", video_export, "--output",
       str(tmp_path / "file"), "--prompt", "x"], capture_output=True, text=True, timeout=300,
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert (done.returncode, done.stderr) == (
      1, f"error: output {tmp_path / 'file'}: a file is in the way of the folder\n")


def test_eval_video_shows_its_progress_on_a_terminal(records, video_export, tmp_path):
  import fcntl, pty, struct, subprocess, sys, termios  # pylint: disable=g-import-not-at-top
  terminal, child_end = pty.openpty()
  # A 24 x 100 terminal (a new pty has 0 columns, where tqdm draws nothing).
  fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
  process = subprocess.Popen(
      [sys.executable, "-m", "tools.eval_video", "--model", video_export, "--data",
       records["eval"], "--num_videos", "2", "--steps", "1", "--batch", "1"],
      stdout=subprocess.PIPE, stderr=child_end, cwd=REPO, env=dict(os.environ,
                                                                   JAX_PLATFORMS="cpu"))
  os.close(child_end)
  shown = b""
  while True:
    try:
      data = os.read(terminal, 4096)
    except OSError:  # EIO: the process has closed the terminal
      break
    if not data:
      break
    shown += data
  os.close(terminal)
  stdout = process.communicate(timeout=300)[0].decode()
  assert process.returncode == 0, shown.decode(errors="replace")[-2000:]
  shown = shown.decode(errors="replace")
  assert "image_scale 2, text_scale 5: 100%" in shown and "2/2" in shown, shown[-2000:]
  assert '"image_scale": 2.0' in stdout  # the scores still go to stdout


def test_eval_video_resumes_from_its_scores(records, video_export, tmp_path):
  """A kill after the direction test: the rerun samples only the settings not yet scored."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top
  output = tmp_path / "eval"
  def run(*guidance):
    done = subprocess.run(
        [sys.executable, "-m", "tools.eval_video", "--model", video_export, "--data",
         records["eval"], "--num_videos", "2", "--steps", "1", "--batch", "2", "--output",
         str(output)] + [f"--guidance={g}" for g in guidance],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
  run("1,1")
  lines = (output / "scores.jsonl").read_text().splitlines()
  assert [json.loads(l).get("test", json.loads(l).get("image_scale")) for l in lines] == [
      "direction_losses", 1.0]
  first = json.loads(lines[1])
  stdout = run("1,1", "2,2")
  assert "direction_losses: already in" in stdout and "text_scale 1: already in" in stdout
  lines = [json.loads(l) for l in (output / "scores.jsonl").read_text().splitlines()]
  assert [(l.get("image_scale"), l.get("text_scale")) for l in lines] == [
      (None, None), (1.0, 1.0), (2.0, 2.0)]
  assert lines[1] == first
  assert {p.name for p in output.iterdir()} >= {"grid_img1_txt1.png", "grid_img2_txt2.png",
                                                "samples_img2_txt2.npy", "direction_losses.npz"}


@pytest.mark.slow
def test_four_devices_with_and_without_fsdp_train_as_one(records, tmp_path, monkeypatch):
  """2 adapter steps, a global batch of 4 clips: 1 device, 4 (data parallel), 4 with the
  frozen UNet and the adapters' state FSDP-sharded. Only the order of float32 sums over
  clips and devices differs: losses and gradient norms to about 1e-6 relative,
  adapters (Adam's second update, at lr 1e-3) within 1e-6."""
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 256)  # split the tiny model's tensors too
  initial, once = model_lib.initial_params, []

  def initial_once(*args, **kwargs):  # the same seed each run: initialise once, not thrice
    once[:] = once or [jax.device_get(initial(*args, **kwargs))]
    return once[0]

  monkeypatch.setattr(model_lib, "initial_params", initial_once)
  runs = {}
  for name, devices, fsdp in (("one", 1, False), ("four", 4, False), ("fsdp", 4, True)):
    config = _config("video", records, batch_size=4, sample_every=0, fsdp=fsdp)
    config.data.eval = ""
    config.num_devices = devices
    workdir = str(tmp_path / name)
    state = video_trainer.train_and_evaluate(config, workdir)
    losses = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    runs[name] = (state, [(l["step"], l["loss"], l["grad_norm"]) for l in losses if "loss" in l])
  split = [x for x in jax.tree.leaves(runs["fsdp"][0].params) if not x.sharding.is_fully_replicated]
  assert len(split) >= 5, len(split)
  one_state, one_losses = runs["one"]
  for name in ("four", "fsdp"):
    state, losses = runs[name]
    assert [l[0] for l in losses] == [l[0] for l in one_losses] == [1, 2]
    np.testing.assert_allclose([l[1:] for l in losses], [l[1:] for l in one_losses], rtol=1e-5)
    mine, ref = flat(jax.device_get(state.params)), flat(jax.device_get(one_state.params))
    assert mine.keys() == ref.keys()
    for path in ref:
      np.testing.assert_allclose(mine[path], ref[path], rtol=0, atol=1e-6, err_msg=f"{name} {path}")


@pytest.mark.slow
def test_video_model_equals_the_image_model_per_frame_at_initialisation(records, image_run):
  """With fresh (identity) adapters the video model reproduces its image model."""
  config = _config("video", records)
  video = model_lib.VideoModel(model_lib.spec_from_config(config))
  image, image_params = model_lib.load_export(os.path.join(image_run, "export"))
  params = model_lib.initial_params(video, jax.random.key(3),
                                    unet=os.path.join(image_run, "export"))
  key = jax.random.key(0)
  x = jax.random.normal(key, (2, FRAMES, SIZE, SIZE, 3))
  t = jnp.array([10, 900])
  context = video.context(params, {}, jnp.asarray(video.tokenize(["a cube", "a torus"])))
  condition = video.first_frame_condition(jax.random.normal(key, x.shape), jnp.array([True, False]))
  got = video.apply(params, x, t, context, condition)
  per_frame = jax.vmap(lambda xf: image.apply(image_params, xf[:, None], t, context, None)[:, 0],
                       in_axes=1, out_axes=1)(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(per_frame), atol=1e-5)


@pytest.mark.slow
def test_direction_losses_are_blind_to_order_for_frame_independent_models(records, image_run):
  """Identity adapters score an orbit and its mirror exactly alike; working adapters do not."""
  np.testing.assert_array_equal(video_trainer.mirrored_order(5), [0, 4, 3, 2, 1])
  config = _config("video", records)
  video = model_lib.VideoModel(model_lib.spec_from_config(config))
  params = model_lib.initial_params(video, jax.random.key(3),
                                    unet=os.path.join(image_run, "export"))
  frames = np.random.default_rng(0).uniform(size=(2, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
  prompts = ["a red cube", "a blue torus"]
  key = jax.random.key(5)
  losses = video_trainer.direction_losses(video, params, {}, frames, prompts, key,
                                          timesteps=(200, 800), repeats=1)
  assert set(losses) == {"forward", "mirrored", "static"}
  assert losses["forward"].shape == (2,) and np.all(losses["forward"] > 0)
  np.testing.assert_allclose(losses["mirrored"], losses["forward"], rtol=1e-5)
  assert np.all(np.abs(losses["static"] - losses["forward"]) > 1e-4)
  # Non-zero adapters mix frames, so the order of the orbit matters.
  adapters, frozen = video_trainer.split_params(config, params)
  keys = iter(jax.random.split(jax.random.key(9), len(jax.tree.leaves(adapters))))
  adapters = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), adapters)
  mixed = video_trainer.merge_params(adapters, frozen)
  losses = video_trainer.direction_losses(video, mixed, {}, frames, prompts, key,
                                          timesteps=(200, 800), repeats=1)
  assert np.abs(losses["mirrored"] - losses["forward"]).max() > 1e-4
  scores = video_trainer.direction_loss_scores(losses)
  assert scores["direction_loss_gain"] == pytest.approx(
      float(np.mean(losses["mirrored"] - losses["forward"])))
  assert 0.0 <= scores["direction_loss_positive"] <= 1.0


def test_first_frame_condition_layout():
  config = video_configs.get_config("tiny")
  model = model_lib.VideoModel(model_lib.spec_from_config(config))
  latents = jnp.arange(2 * 3 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 3, 2, 2, 3) + 1
  cond = np.asarray(model.first_frame_condition(latents, jnp.array([True, False])))
  assert cond.shape == (2, 3, 2, 2, 4)
  np.testing.assert_array_equal(cond[0, 0, ..., :3], latents[0, 0])
  np.testing.assert_array_equal(cond[0, 0, ..., 3], 1.0)
  np.testing.assert_array_equal(cond[0, 1:], 0.0)
  np.testing.assert_array_equal(cond[1], 0.0)  # dropped image: all zeros


def test_consistency_scores_rank_a_turning_orbit_above_a_static_one():
  rng = np.random.default_rng(0)
  truth = rng.uniform(size=(2, 4, 16, 16, 3)).astype(np.float32)
  perfect = video_trainer.consistency_scores(truth + 0.01, truth)
  static = video_trainer.consistency_scores(np.repeat(truth[:, :1], 4, axis=1), truth)
  assert perfect["orbit_psnr"] == pytest.approx(40.0, abs=0.1)
  assert perfect["orbit_psnr"] > perfect["static_psnr"] + 20
  assert static["orbit_psnr"] == pytest.approx(static["static_psnr"])
  # Frames 1 and 3 of a 4-frame orbit are mirror azimuths: the right turn gains, the wrong loses.
  assert perfect["direction_psnr_gain"] > 20
  assert static["direction_psnr_gain"] == pytest.approx(0.0, abs=1e-4)
  backwards = truth[:, [0, 3, 2, 1]]
  assert video_trainer.consistency_scores(backwards, truth)["direction_psnr_gain"] < -20


def test_silhouette_scores_follow_a_turning_shape():
  """A bar on white turning 90 degrees a frame: its silhouette says which way it turns."""
  frames = np.ones((1, 4, 16, 16, 3), np.float32)
  frames[0, 0, 6:10, 2:14] = 0.2   # horizontal bar
  frames[0, 1, 2:10, 6:10] = 0.2   # upper half of a vertical bar
  frames[0, 2, 6:10, 2:14] = 0.2
  frames[0, 3, 6:14, 6:10] = 0.2   # lower half: frame 3 mirrors frame 1
  right = video_trainer.consistency_scores(frames, frames)
  # Frames 1 and 3 overlap in a third of their union: gain 1 - 1/3.
  assert right["orbit_iou"] == 1.0 and right["direction_iou_gain"] == pytest.approx(2 / 3)
  wrong = video_trainer.consistency_scores(frames[:, [0, 3, 2, 1]], frames)
  assert wrong["direction_iou_gain"] == pytest.approx(-2 / 3)
  # The ceiling is the renders' own gain, whatever the samples.
  assert wrong["direction_iou_gain_max"] == pytest.approx(2 / 3)
  static = video_trainer.consistency_scores(np.repeat(frames[:, :1], 4, axis=1), frames)
  assert static["direction_iou_gain"] == 0.0 and static["direction_iou_gain_max"] == pytest.approx(2 / 3)
  # Frames 1 and 3 look different (IoU 1/3): both count; the static clip ties on each.
  assert right["direction_frames"] == 2
  assert right["direction_accuracy"] == 1.0 and wrong["direction_accuracy"] == 0.0
  assert static["direction_accuracy"] == 0.5
  half = frames[:, [0, 1, 2, 1]]  # right at frame 1, wrong at frame 3
  assert video_trainer.consistency_scores(half, frames)["direction_accuracy"] == 0.5
  noisy = frames + np.random.default_rng(0).normal(0, 0.02, frames.shape).astype(np.float32)
  assert video_trainer.consistency_scores(noisy, frames)["orbit_iou"] == 1.0


def test_sampling_is_deterministic_per_seed_and_checks_inputs(image_run):
  model, params = model_lib.load_export(os.path.join(image_run, "export"))
  options = sampling.SampleOptions(num_steps=2, sampler="dpm_solver_pp")
  a = sampling.sample_clips(model, params, {}, ["a cube"], jax.random.key(1), options=options)
  b = sampling.sample_clips(model, params, {}, ["a cube"], jax.random.key(1), options=options)
  assert a.shape == (1, model.spec.num_frames, SIZE, SIZE, 3)
  assert a.min() >= 0 and a.max() <= 1
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="no first-frame conditioning"):
    sampling.sample_clips(model, params, {}, ["a cube"], jax.random.key(1),
                          first_frames=np.zeros((1, SIZE, SIZE, 3)), options=options)
  with pytest.raises(ValueError, match="sampler must be one of"):
    sampling.SampleOptions(sampler="euler")
  with pytest.raises(ValueError, match="guidance_rescale must be in"):
    sampling.SampleOptions(guidance_rescale=1.5)


def _sd_folder(root):
  """A Stable-Diffusion-layout folder of tiny random models: unet/, vae/, text_encoder/, tokenizer/."""
  import transformers  # pylint: disable=g-import-not-at-top
  from tests.models.test_text import _write_tokenizer_files  # pylint: disable=g-import-not-at-top
  from vf3d_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from vf3d_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from vf3d_jax.weights import sd_unet, sd_vae  # pylint: disable=g-import-not-at-top
  from vf3d_jax.weights.state_dict import write_safetensors  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  random = lambda shapes: jax.tree.map(
      lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  image_arch = unet_lib.UNetArch(in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                 attention_levels=(False, True), layers_per_block=1,
                                 attention_heads=2, cross_attention_dim=32, norm_num_groups=4)
  unet_params = random(unet_lib.param_shapes(image_arch))
  os.makedirs(os.path.join(root, "unet"))
  write_safetensors(sd_unet.unet_to_state_dict(unet_params),
                    os.path.join(root, "unet", "diffusion_pytorch_model.safetensors"))
  vae_arch = vae_lib.VAEArch.tiny()
  os.makedirs(os.path.join(root, "vae"))
  write_safetensors(sd_vae.vae_to_state_dict(random(vae_lib.param_shapes(vae_arch))),
                    os.path.join(root, "vae", "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(root, "vae", "config.json"), "w") as f:
    json.dump({"_class_name": "AutoencoderKL", **vae_arch.to_dict()}, f)
  vocab = _write_tokenizer_files(os.path.join(root, "tokenizer"))
  config = transformers.CLIPTextConfig(
      vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=8, bos_token_id=vocab["<|startoftext|>"],
      eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
  transformers.FlaxCLIPTextModel(config).save_pretrained(os.path.join(root, "text_encoder"))
  return image_arch, unet_params


@pytest.mark.slow
def test_adapters_train_over_a_stable_diffusion_layout_folder(records, tmp_path):
  """The sd15 recipe end to end on tiny random SD-layout weights: VAE latents, CLIP text,
  rematerialised blocks; the image UNet stays exactly the file's."""
  root = str(tmp_path / "sd")
  image_arch, unet_params = _sd_folder(root)
  config = video_configs.get_config("sd15")
  config.model.update(block_out_channels=(8, 16), attention_levels=(False, True),
                      layers_per_block=1, attention_heads=2, cross_attention_dim=32,
                      norm_num_groups=4, motion_heads=2)
  config.init.unet = os.path.join(root, "unet")
  config.latent.vae = os.path.join(root, "vae")
  config.text.update(path=root, max_length=8, width=32)
  config.data.update(train=records["train"], eval=records["eval"], num_frames=FRAMES,
                     frame_resolution=SIZE, num_workers=0)
  config.train.update(steps=1, batch_size=2, log_every=1, checkpoint_every=1, sample_every=1,
                      warmup_steps=1)
  config.sample.update(num_steps=2, num_videos=2)
  config.dtype = "float32"
  config.num_devices = 1
  workdir = str(tmp_path / "run")
  video_trainer.train_and_evaluate(config, workdir)
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert np.isfinite(lines[0]["loss"]) and "sample/orbit_psnr" in lines[-1]
  model, params = model_lib.load_export(os.path.join(workdir, "export"))
  assert model.spec.latent["kind"] == "vae" and model.latent_size == SIZE // 2
  exported = flat(params["unet"])
  for path, value in flat(unet_params).items():
    np.testing.assert_array_equal(exported[path], value, err_msg=path)
  assert any("motion_modules" in p for p in exported)
