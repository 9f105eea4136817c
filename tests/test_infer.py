"""The inference job end to end on a tiny checkpoint in the released key layout."""

import os
import re
import subprocess
import sys

import imageio.v2 as imageio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
import trimesh

from configs import infer as infer_configs
from configs import lrm as lrm_configs
from vf3d_jax.inference import pipeline as infer
from vf3d_jax.inference.preprocess import ImageLoadError, load_image
from vf3d_jax.inference.texture import sample_texture
from vf3d_jax.models import lrm
from vf3d_jax.engine import features
from vf3d_jax.weights import vfusion3d
from vf3d_jax.weights.state_dict import write_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = lrm.LRMArch.from_dict(lrm_configs.get_config("tiny").model.to_dict())


def _tiny_params():
  """A model whose output is a solid cube, whatever the image.

  The upsampler emits constant planes (channel 0 = 1). Inside the box the three
  sampled channel-0 values sum to 3; on the box faces grid_sample's zero
  padding halves two of them (sum 2). The decoder maps that sum s to a raw
  density 4 s - 8: softplus(3) ~ 3.05 inside, softplus(-1) ~ 0.31 on the faces,
  so the density-1 surface is a cube just inside [-1, 1]^3, with a fixed colour.
  """
  params = features.random_params(lrm.param_shapes(TINY), 0)  # NumPy: no initialiser compiles
  deconv = params["transformer"]["deconv"]
  deconv["kernel"] = jnp.zeros_like(deconv["kernel"])
  deconv["bias"] = jnp.zeros_like(deconv["bias"]).at[0].set(1.0)
  c = TINY.triplane_channels
  dec = params["synthesizer"]["decoder"]
  first = jnp.zeros_like(dec["net_0"]["kernel"])
  dec["net_0"] = {"kernel": first.at[jnp.array([0, c, 2 * c]), 0].set(1.0),
                  "bias": jnp.zeros_like(dec["net_0"]["bias"])}
  for name in ("net_2", "net_4"):
    dec[name] = {"kernel": jnp.zeros_like(dec[name]["kernel"]).at[0, 0].set(1.0),
                 "bias": jnp.zeros_like(dec[name]["bias"])}
  dec["net_6"] = {"kernel": jnp.zeros_like(dec["net_6"]["kernel"]).at[0, 0].set(4.0),
                  "bias": jnp.asarray([-8.0, 2.0, -2.0, 0.0])}
  return params


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("infer")
  ckpt = root / "model.safetensors"
  vfusion3d.save_checkpoint_file(ckpt, TINY, _tiny_params())
  images = root / "images"
  images.mkdir()
  rgba = np.zeros((90, 70, 4), np.uint8)
  yy, xx = np.mgrid[:90, :70]
  rgba[((yy - 45) ** 2 + (xx - 35) ** 2) < 25 ** 2] = (40, 160, 90, 255)
  Image.fromarray(rgba).save(images / "disc.png")
  rgb = np.full((60, 80, 3), 250, np.uint8)
  rgb[15:45, 25:55] = (200, 30, 30)
  Image.fromarray(rgb).save(images / "square.jpg", quality=95)
  (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  return root, ckpt, images


def _config(**render):
  config = infer_configs.get_config("demo")
  config.render.num_views = 4
  config.render.resolution = 24
  config.render.num_coarse = 16
  config.render.num_fine = 16
  config.render.views_per_call = 2
  config.mesh.resolution = 24
  for k, v in render.items():
    setattr(config.render, k, v)
  return config


def test_folder_with_a_bad_image(workspace):
  root, ckpt, images = workspace
  out = root / "out"
  results = infer.run(_config(), str(ckpt), str(images), str(out), deterministic=True,
                      save_arrays=True, progress=False)
  assert "error" in results[str(images / "broken.png")]
  for name in ("disc", "square"):
    folder = out / name
    files = sorted(os.listdir(folder))
    assert files == ["frames.npy", "input.png", "mesh.glb", "planes.npy", "turntable.mp4"], files
    planes = np.load(folder / "planes.npy")
    assert planes.shape == (3, TINY.triplane_channels, TINY.plane_res, TINY.plane_res)
    frames = np.load(folder / "frames.npy")
    assert frames.shape == (4, 24, 24, 3) and frames.dtype == np.float32
    video = np.stack(imageio.mimread(folder / "turntable.mp4"))
    assert video.shape[:3] == (4, 24, 24)
    # The solid box renders its colour, not the white background, at the centre.
    assert np.abs(frames[:, 12, 12] - frames[0, 12, 12]).max() < 1e-5
    assert frames[0, 12, 12].mean() < 0.9
    # The default mesh: a UV-textured GLB whose texture holds the field's colour.
    mesh = trimesh.load(folder / "mesh.glb", force="mesh", process=False)
    # The cube's surface: between the last two grid layers, ~0.978 for this field.
    np.testing.assert_allclose(np.abs(mesh.bounds), 0.978, atol=0.02)
    assert mesh.visual.kind == "texture"
    atlas = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), np.float32) / 255
    # trimesh flips v on loading a glTF back to the OpenGL convention sample_texture uses.
    colors = sample_texture(atlas, np.asarray(mesh.visual.uv)) * 255
    np.testing.assert_allclose(colors, np.broadcast_to([225, 30, 128], colors.shape), atol=1.5)
  assert not (out / "broken").exists()
  assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]


def test_deterministic_runs_repeat_and_random_runs_differ(workspace):
  root, ckpt, images = workspace
  image = str(images / "disc.png")
  run = lambda out, det, seed=0: np.load(os.path.join(out, "disc", "frames.npy")) if infer.run(
      _config(), str(ckpt), image, out, deterministic=det, save_arrays=True,
      progress=False) else None
  a = run(str(root / "d1"), True)
  b = run(str(root / "d2"), True)
  c = run(str(root / "r1"), False)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 0


def test_the_fast_mode_renders_the_compatible_turntable(workspace):
  """The fast variant's renderer (16 + 16 samples in the occupied cells) against the
  released sampling (64 + 64 everywhere), with the occupancy grid built once."""
  _, ckpt, _ = workspace
  arch, params = vfusion3d.load_checkpoint_file(str(ckpt))
  fast_config = _config(**{k: v for k, v in infer_configs.get_config("fast").render.items()
                           if k in ("mode", "num_coarse", "num_fine", "occupancy_resolution",
                                    "occupancy_subdivision", "num_probes", "termination",
                                    "jitter", "proposal")})
  assert fast_config.render.mode == "fast" and fast_config.render.proposal
  assert (fast_config.render.num_coarse, fast_config.render.num_fine) == (64, 12)
  assert not fast_config.render.jitter
  reference_config = _config(mode="compatible", num_coarse=64, num_fine=64)
  fast, reference = (infer.Reconstructor(arch, params, c) for c in (fast_config, reference_config))
  planes = fast.planes(np.full((TINY.input_size, TINY.input_size, 3), 0.5, np.float32))
  grid = np.asarray(fast.occupancy(planes).occupied)
  assert grid.shape == (128,) * 3 and grid.any()
  assert reference.occupancy(planes) is None
  key = jax.random.key(0)
  a, b = fast.turntable(planes, key, progress=False), reference.turntable(planes, key, False)
  psnr = -10 * np.log10(np.mean(np.square(a - b)))
  assert psnr > 40.0, psnr
  # Without jitter a key changes only the orbit's angle offset.
  np.testing.assert_allclose(fast.turntable(planes, jax.random.key(0), False), a, atol=1e-6)


def _infer(*args):
  return subprocess.run([sys.executable, "-m", "vf3d_jax.infer", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_reports_bad_checkpoint_in_one_line(workspace, tmp_path):
  _, _, images = workspace
  bad = tmp_path / "notes.txt"
  bad.write_text("hello")
  result = _infer("--checkpoint", str(bad), "--image", str(images), "--output",
                  str(tmp_path / "o"))
  assert (result.returncode, result.stderr) == (
      1, f"error: {bad}: not a safetensors file or a PyTorch checkpoint\n")
  assert not (tmp_path / "o").exists()


def test_cli_checks_image_output_and_config_before_the_checkpoint(workspace, tmp_path):
  _, _, images = workspace
  bad = tmp_path / "notes.txt"
  bad.write_text("hello")  # would fail to load, but is never reached
  missing = tmp_path / "nope.png"
  result = _infer("--checkpoint", str(bad), "--image", str(missing), "--output",
                  str(tmp_path / "o"))
  assert (result.returncode, result.stderr) == (1, f"error: {missing}: no such file or folder\n")
  in_the_way = tmp_path / "file"
  in_the_way.write_text("")
  for output, where in ((in_the_way, ""), (in_the_way / "sub", f" ({in_the_way})")):
    result = _infer("--checkpoint", str(bad), "--image", str(images), "--output", str(output))
    assert (result.returncode, result.stderr) == (
        1, f"error: output {output}: a file{where} is in the way of the folder\n")
  result = _infer("--config.render.fps=0", "--checkpoint", str(bad), "--image", str(images),
                  "--output", str(tmp_path / "o"))
  assert (result.returncode, result.stderr) == (
      1, "error: render.fps must be a number >= 1, got 0\n")
  assert result.stdout == "" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("field, value, message", [
    ("render.num_views", 0, "render.num_views must be a number >= 1, got 0"),
    ("render.resolution", -8, "render.resolution must be a number >= 1, got -8"),
    ("render.fps", 0, "render.fps must be a number >= 1, got 0"),
    ("render.mode", "quick", "render.mode must be one of compatible, clean, fast, got 'quick'"),
    ("mesh.resolution", 1, "mesh.resolution must be a number >= 2, got 1"),
    ("mesh.coarse_block", 1, "mesh.coarse_block must be 0 (off) or an integer >= 2, got 1"),
    ("preprocess.max_side", 0, "preprocess.max_side must be a number >= 1, got 0"),
    ("preprocess.foreground_ratio", 0.0, "preprocess.foreground_ratio must be in (0, 1], got 0.0"),
])
def test_bad_settings_are_named_before_the_checkpoint_loads(workspace, tmp_path, field, value,
                                                            message):
  _, _, images = workspace
  config = _config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError) as e:
    infer.run(config, str(tmp_path / "absent.safetensors"), str(images), str(tmp_path / "o"),
              progress=False)
  assert str(e.value) == message
  config.render.enabled = config.mesh.enabled = False  # unused settings are not checked
  if section in ("render", "mesh"):
    infer.validate_config(config)


def test_output_names_are_distinct():
  assert infer.output_names(["a/obj.png", "b/obj.jpg", "c/cube.png"]) == [
      "obj_png", "obj_jpg", "cube"]
  assert infer.output_names(["obj.png", "obj.PNG", "Obj.png"]) == ["obj_png", "obj_PNG-2",
                                                                 "Obj_png-3"]
  assert infer.output_names(["obj.png", "obj.jpg", "obj_png.gif"]) == [
      "obj_png", "obj_jpg", "obj_png-2"]
  assert infer.output_names(["photo"]) == ["photo"]


def test_images_with_the_same_stem_get_their_own_folders(workspace, tmp_path, capsys):
  root, ckpt, images = workspace
  same = tmp_path / "same"
  same.mkdir()
  for ext in ("png", "jpg"):
    (same / f"disc.{ext}").write_bytes((images / "disc.png").read_bytes())
  out = tmp_path / "out"
  config = _config()
  config.mesh.update(texture="vertex", format="obj")
  results = infer.run(config, str(ckpt), str(same), str(out), deterministic=True,
                      progress=True)
  bars = capsys.readouterr().err
  assert "images: 100%" in bars and "2/2" in bars and "turntable" in bars and "mesh grid" in bars
  assert sorted(os.listdir(out)) == ["disc_jpg", "disc_png"]
  for ext in ("png", "jpg"):
    folder = out / f"disc_{ext}"
    assert results[str(same / f"disc.{ext}")]["folder"] == str(folder)
    assert sorted(os.listdir(folder)) == ["input.png", "mesh.obj", "turntable.mp4"]
    assert results[str(same / f"disc.{ext}")]["files"] == [
        str(folder / f) for f in ("input.png", "turntable.mp4", "mesh.obj")]
    # mesh.texture=vertex: the released output, a vertex-coloured OBJ.
    mesh = trimesh.load(folder / "mesh.obj", process=False)
    assert mesh.visual.kind == "vertex" and len(mesh.visual.vertex_colors) == len(mesh.vertices)


def test_a_failed_image_leaves_no_folder_and_keeps_the_previous_one(workspace, tmp_path,
                                                                  monkeypatch):
  _, ckpt, images = workspace
  out = tmp_path / "out"
  image = str(images / "disc.png")
  config = _config()
  config.mesh.enabled = False
  infer.run(config, str(ckpt), image, str(out), deterministic=True, progress=False)
  before = (out / "disc" / "input.png").read_bytes()

  def full_disk(frames, path, fps):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(infer, "write_video", full_disk)
  results = infer.run(config, str(ckpt), image, str(tmp_path / "new"), deterministic=True,
                      progress=False)
  assert results[image] == {"error": "[Errno 28] No space left on device"}
  assert os.listdir(tmp_path / "new") == []  # no half-written folder (input.png only)
  results = infer.run(config, str(ckpt), image, str(out), deterministic=True, progress=False)
  assert "error" in results[image]
  assert sorted(os.listdir(out)) == ["disc"]  # the old folder is kept, no temporary left
  assert sorted(os.listdir(out / "disc")) == ["input.png", "turntable.mp4"]
  assert (out / "disc" / "input.png").read_bytes() == before

  monkeypatch.undo()
  config.render.enabled = False
  infer.run(config, str(ckpt), image, str(out), deterministic=True, progress=False)
  assert sorted(os.listdir(out / "disc")) == ["input.png"]  # a complete run replaces it


def test_cli_end_to_end_with_overrides(workspace, tmp_path):
  _, ckpt, images = workspace
  out = tmp_path / "cli"
  two = tmp_path / "two"  # a good image and a broken one
  two.mkdir()
  for name in ("disc.png", "broken.png"):
    (two / name).write_bytes((images / name).read_bytes())
  with pytest.raises(ImageLoadError) as unreadable:
    load_image(two / "broken.png")
  result = subprocess.run(
      [sys.executable, "-m", "vf3d_jax.infer", "--config", "configs/infer.py:demo",
       "--config.render.num_views=3", "--config.render.resolution=16",
       "--config.render.format=gif", "--config.mesh.resolution=16", "--config.mesh.format=ply",
       "--config.mesh.texture=vertex",
       "--checkpoint", str(ckpt), "--image", str(two), "--output", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert (result.returncode, result.stderr) == (
      1, f"{two / 'broken.png'}: error: {unreadable.value}\nerror: 1 of 2 images failed\n")
  assert "preprocess" in result.stdout and "total" in result.stdout
  # The summary names the mask's source and how much of the image it covers.
  disc = np.asarray(Image.open(images / "disc.png"))[..., 3] > 127
  assert f"matte image, foreground {100 * disc.mean():.0f}%;" in result.stdout, result.stdout
  faces = len(trimesh.load(out / "disc" / "mesh.ply", process=False).faces)
  assert re.search(rf"mesh [0-9.]+ s \({faces:,} faces[;)]", result.stdout), result.stdout
  assert sorted(os.listdir(out)) == ["disc"]
  assert sorted(os.listdir(out / "disc")) == ["input.png", "mesh.ply", "turntable.gif"]
  typo = subprocess.run(
      [sys.executable, "-m", "vf3d_jax.infer", "--config.render.num_veiws=3"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert typo.returncode != 0 and "num_veiws" in typo.stderr


def test_a_complex_background_warns_and_strict_refuses(workspace, tmp_path, capsys):
  root, ckpt, _ = workspace
  yy, xx = np.mgrid[0:96, 0:96] / 95
  rgb = np.stack([0.6 + 0.2 * xx, 0.6 + 0.2 * yy, 0.7 * np.ones_like(xx)], -1)
  rgb[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.04] = (0.8, 0.1, 0.1)
  rgb[0:30, 5:25] = (0.1, 0.3, 0.9)  # other shapes crossing the border
  rgb[70:96, 60:90] = (0.1, 0.8, 0.2)
  path = tmp_path / "busy.png"
  Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
  config = _config()
  config.preprocess.matting = "grabcut"
  config.mesh.enabled = False
  results = infer.run(config, str(ckpt), str(path), str(tmp_path / "out"), progress=False)
  assert "folder" in results[str(path)]
  err = capsys.readouterr().err
  assert f"{path}: warning: the background looks too complex for the grabcut matte" in err
  config.preprocess.strict = True
  results = infer.run(config, str(ckpt), str(path), str(tmp_path / "strict"), progress=False)
  assert "strict refuses" in results[str(path)]["error"]
  assert not (tmp_path / "strict" / "busy").exists()
