"""Text -> 3D (``infer --prompt``): prompt -> first frame -> orbit video -> LRM -> outputs."""

import os
import subprocess
import sys

import imageio.v2 as imageio
import jax
import numpy as np
import pytest
from PIL import Image

from configs import video as video_configs
from tests import test_infer
from vf3d_jax.inference import text_to_3d
from vf3d_jax.video import model as model_lib
from vf3d_jax.weights import vfusion3d

REPO = test_infer.REPO
FRAMES, SIZE = 4, 16


def _export(stage: str, directory) -> str:
  """A small video model of ``stage`` with all-zero parameters, exported."""
  config = video_configs.get_config("tiny_image" if stage == "image" else "tiny")
  config.model.update(block_out_channels=(8, 16), attention_levels=(False, True),
                      attention_heads=2, cross_attention_dim=16, norm_num_groups=4, motion_heads=2)
  config.text.update(width=16, vocab_size=64, max_length=8)
  config.data.update(num_frames=FRAMES, frame_resolution=SIZE)
  spec = model_lib.spec_from_config(config)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model_lib.param_shapes(spec))
  return model_lib.save_export(str(directory / stage), spec, params)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("text_to_3d")
  checkpoint = root / "lrm.safetensors"
  vfusion3d.save_checkpoint_file(checkpoint, test_infer.TINY, test_infer._tiny_params())
  return str(checkpoint), _export("image", root), _export("video", root)


def _config(image_model, video_model):
  config = test_infer._config()
  config.text.update(image_model=image_model, video_model=video_model, fps=4)
  config.text.sample.update(num_steps=2)
  return config


def _red_square(prompt, key):
  """A first frame: a red square on white (what a trained image model would draw)."""
  del prompt, key
  frame = np.ones((SIZE, SIZE, 3), np.float32)
  frame[4:12, 4:12] = (0.9, 0.1, 0.1)
  return frame


def test_prompt_names_are_distinct_file_names():
  names = text_to_3d.prompt_names(["a red cone on a blue box", "A red cone, on a blue box!",
                                   "???", "x" * 100])
  assert names == ["a_red_cone_on_a_blue_box", "a_red_cone_on_a_blue_box-2", "prompt_02",
                   "x" * 48]


def test_a_prompt_gives_the_image_outputs_plus_its_frame_and_orbit(models, tmp_path, monkeypatch):
  checkpoint, image_model, video_model = models
  monkeypatch.setattr(text_to_3d.TextTo3D, "first_frame", lambda self, p, k: _red_square(p, k))
  out = tmp_path / "out"
  results = text_to_3d.run(_config(image_model, video_model), checkpoint,
                           ["a red box", "A red box!"], str(out), deterministic=True,
                           progress=False)
  assert [r.get("error") for r in results.values()] == [None, None]
  assert sorted(os.listdir(out)) == ["a_red_box", "a_red_box-2"]
  folder = out / "a_red_box"
  files = sorted(os.listdir(folder))
  assert files == ["first_frame.png", "input.png", "mesh.glb", "orbit.mp4", "prompt.txt",
                   "turntable.mp4"], files
  assert (folder / "prompt.txt").read_text() == "a red box\n"
  orbit = np.stack(imageio.mimread(folder / "orbit.mp4"))
  assert orbit.shape[:3] == (FRAMES, SIZE, SIZE)
  first = np.asarray(Image.open(folder / "first_frame.png"))
  np.testing.assert_array_equal(first[8, 8], (230, 26, 26))
  # The LRM's input is the first frame, matted and recentred: red at the centre.
  image = np.asarray(Image.open(folder / "input.png")).astype(int)
  centre = image[image.shape[0] // 2, image.shape[1] // 2]
  assert centre[0] > 180 and centre[1] < 60 and centre[2] < 60, centre
  turntable = np.stack(imageio.mimread(folder / "turntable.mp4"))
  assert turntable.shape[:3] == (4, 24, 24)
  for key, seconds in results["a red box"]["seconds"].items():
    assert seconds >= 0, key
  assert set(results["a red box"]["seconds"]) >= {"first frame", "orbit video", "planes"}


def test_an_empty_first_frame_fails_that_prompt_alone(models, tmp_path):
  """The all-zero image model draws flat grey: no object to reconstruct, no folder."""
  checkpoint, image_model, video_model = models
  out = tmp_path / "out"
  results = text_to_3d.run(_config(image_model, video_model), checkpoint, ["a cone"], str(out),
                           progress=False)
  assert "error" in results["a cone"]
  assert not (out / "a_cone").exists()


@pytest.mark.parametrize("field,value,message", [
    ("image_model", "", "text.image_model is empty"),
    ("video_model", "/nonexistent", "text.video_model: /nonexistent: not an exported video"),
])
def test_bad_text_settings_are_named_before_anything_loads(models, tmp_path, field, value,
                                                           message):
  checkpoint, image_model, video_model = models
  config = _config(image_model, video_model)
  config.text[field] = value
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    text_to_3d.run(config, checkpoint, ["a cone"], str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_the_image_stage_is_refused_as_the_video_model(models, tmp_path):
  checkpoint, image_model, _ = models
  with pytest.raises(ValueError, match="no first-frame conditioning"):
    text_to_3d.run(_config(image_model, image_model), checkpoint, ["a cone"], str(tmp_path))


def test_cli_refuses_images_and_prompts_together(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "vf3d_jax.infer", "--prompt", "a cone", "--image", str(tmp_path),
       "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == ["error: give --image or --prompt, not both"]
