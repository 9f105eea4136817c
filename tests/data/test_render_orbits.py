"""End to end: procedural assets and real mesh files -> records -> loader."""

import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import trimesh
from PIL import Image

from vf3d_jax.data import pipeline
from vf3d_jax.data import procedural
from vf3d_jax.data import records
from vf3d_jax.data import render_orbits
from tests.data import test_records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_render_config():
  spec = importlib.util.spec_from_file_location("render_config",
                                                os.path.join(REPO, "configs", "render.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


render_config = _load_render_config()


def _tiny(tmp_path, **overrides):
  config = render_config.get_config("tiny")
  config.output_dir = str(tmp_path)
  config.num_assets = 5
  config.examples_per_shard = 2
  config.resolution = 32
  config.batch_size = 2
  config.views.num_orbit_views = 4
  config.views.num_random_views = 1
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


_read = test_records._read_all  # pylint: disable=protected-access


def test_procedural_dataset_renders_resumes_and_loads(tmp_path, monkeypatch, capsys):
  reference_folder = render_orbits.render_dataset(_tiny(tmp_path / "reference"))
  # Progress (on by default): a line at the start and one at the end, into a log.
  progress = capsys.readouterr().err.splitlines()
  assert progress[0] == "tiny:   0%|          | 0/5 [00:00<?, ?asset/s]", progress
  assert re.fullmatch(r"tiny: 100%\|#{10}\| 5/5 \[\d\d:\d\d<00:00, +[\d.]+(s/asset|asset/s)\]",
                      progress[1]), progress
  reference = _read(reference_folder)
  assert len(reference) == 5
  for index, record in enumerate(reference):
    assert record.num_views == 5 and record.num_orbit_views == 4
    assert record.caption == procedural.sample_asset(0, index).caption
    rgba = np.stack([records.decode_png(png) for png in record.images])
    assert rgba.shape == (5, 32, 32, 4)
    coverage = (rgba[..., 3] > 0).mean(axis=(1, 2))
    assert np.all(coverage > 0.02) and np.all(coverage < 0.9)
    np.testing.assert_allclose(record.elevation[:4], record.elevation_estimate, rtol=1e-6)

  # Crash while rendering the third shard, then run again: same records.
  real_render = render_orbits._render_procedural
  calls = {"count": 0}

  def failing(config, indices):
    if indices[0] >= 4:
      raise KeyboardInterrupt
    calls["count"] += 1
    return real_render(config, indices)

  monkeypatch.setattr(render_orbits, "_render_procedural", failing)
  capsys.readouterr()
  with pytest.raises(KeyboardInterrupt):
    render_orbits.render_dataset(_tiny(tmp_path / "resumed", progress=False))
  assert capsys.readouterr().err == ""
  monkeypatch.setattr(render_orbits, "_render_procedural", real_render)
  folder = render_orbits.render_dataset(_tiny(tmp_path / "resumed"))
  assert capsys.readouterr().err.splitlines()[0] == (
      "tiny:  80%|########  | 4/5 [00:00<?, ?asset/s]")
  resumed = _read(folder)
  assert [r.asset_id for r in resumed] == [r.asset_id for r in reference]
  for a, b in zip(resumed, reference):
    assert list(a.images) == list(b.images)
    np.testing.assert_array_equal(a.c2w, b.c2w)

  # The loader reads it.
  config = pipeline.default_config()
  config.datasets = [{"path": folder, "weight": 1.0}]
  config.update(dict(batch_size=2, num_workers=0, input_resolution=32, render_resolution=32,
                     crop_size=16, num_render_views=3, shard_index=0, shard_count=1))
  batch = next(iter(pipeline.make_dataset(config)))
  assert batch["render_rgb"].shape == (2, 3, 16, 16, 3)
  assert batch["source_image"].min() < 0.9  # something in front of the white


def _textured_box(path):
  texture = np.zeros((32, 32, 3), np.uint8)
  texture[:, :16] = [230, 20, 20]
  texture[:, 16:] = [20, 20, 230]
  box = trimesh.creation.box(extents=(1.0, 0.6, 0.8))
  box.unmerge_vertices()
  uv = np.stack([(box.vertices[:, 0] + 0.5), (box.vertices[:, 2] + 0.4) / 0.8], 1)
  box.visual = trimesh.visual.TextureVisuals(
      uv=uv, material=trimesh.visual.material.PBRMaterial(
          baseColorTexture=Image.fromarray(texture), baseColorFactor=[255, 255, 255, 255]))
  box.export(path)


def test_real_mesh_files_render_end_to_end(tmp_path):
  meshes_dir = tmp_path / "meshes"
  meshes_dir.mkdir()
  _textured_box(str(meshes_dir / "box.glb"))
  sphere = trimesh.creation.icosphere(subdivisions=3)
  sphere.visual.vertex_colors = np.tile([30, 200, 40, 255], (len(sphere.vertices), 1))
  sphere.export(str(meshes_dir / "sphere.ply"))
  cone = trimesh.creation.cone(radius=0.5, height=1.2, sections=24)
  cone.export(str(meshes_dir / "cone.obj"))
  captions = tmp_path / "captions.json"
  captions.write_text('{"sphere": "a green ball"}')
  config = _tiny(tmp_path / "out", source="meshes", name="meshes", num_assets=0)
  config.meshes.glob = str(meshes_dir / "*")
  config.meshes.captions_file = str(captions)
  config.resolution = 48
  config.supersample = 2
  config.surface_points = 500
  got = {r.asset_id: r for r in _read(render_orbits.render_dataset(config))}
  assert sorted(got) == ["box", "cone", "sphere"]
  # The true surface, area-weighted, in the record's world frame: the normalised sphere has radius 1.
  assert all(r.surface.shape == (500, 3) for r in got.values())
  radius = np.linalg.norm(got["sphere"].surface, axis=-1)
  assert radius.min() > 0.97 and radius.max() < 1.0 + 1e-5, (radius.min(), radius.max())
  assert np.abs(got["box"].surface).max() == pytest.approx(1.0, abs=1e-5)
  assert got["sphere"].caption == "a green ball"
  for record in got.values():
    rgba = np.stack([records.decode_png(png) for png in record.images]).astype(float)
    covered = rgba[..., 3] == 255
    assert covered.mean() > 0.03
    colors = rgba[covered][:, :3]
    if record.asset_id == "sphere":
      assert np.all(colors[:, 1] > colors[:, 0]) and np.all(colors[:, 1] > colors[:, 2])
    if record.asset_id == "box":  # both halves of the texture show up
      assert np.any(colors[:, 0] > 2 * colors[:, 2]) and np.any(colors[:, 2] > 2 * colors[:, 0])


def _tool(*args, variant="tiny"):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "tools.render_orbits", "--config", f"configs/render.py:{variant}",
       *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_command_line(tmp_path):
  # A failed run leaves nothing that blocks a correct one.
  failed = _tool("--config.num_assets=2", "--config.resolution=0",
                 f"--config.output_dir={tmp_path}")
  assert (failed.returncode, failed.stderr) == (
      1, "error: config.resolution must be positive, got 0\n")
  assert os.listdir(tmp_path) == []
  done = _tool("--config.num_assets=2", "--config.resolution=16",
               f"--config.output_dir={tmp_path}")
  assert done.returncode == 0, done.stderr[-2000:]
  folder = tmp_path / "tiny" / "1.0.0"
  assert done.stdout == f"{folder}\n"
  assert len(_read(folder)) == 2
  lines = done.stderr.splitlines()
  assert len(lines) == 3 and "\r" not in done.stderr, done.stderr
  assert lines[1].startswith("tiny: 100%|##########| 2/2 [") and lines[2].endswith(
      f"Wrote 2 records to {folder}")
  # Rendering something else into that folder names what differs.
  other = _tool("--config.num_assets=2", "--config.resolution=24", "--config.seed=3",
                f"--config.output_dir={tmp_path}")
  assert (other.returncode, other.stderr) == (
      1, f"error: {folder} holds 1 complete shard(s) of a different dataset plan (resolution "
      "was 16, now 24; seed was 0, now 3); use another folder or name, or delete that folder "
      "to start again\n")
  typo = _tool("--config.num_asset=2", f"--config.output_dir={tmp_path / 'typo'}")
  assert typo.returncode != 0 and "num_asset" in typo.stderr
  assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("args, stderr", [
    (["--config.views.radius=1.0"],
     "error: config.views.radius must be 0 (the distance that keeps the whole [-1, 1]^3 box in "
     "view) or more than 1.742, outside that box, got 1.0\n"),
    (["--config.procedural.patterns=solid,plaid"],
     "error: config.procedural.patterns must list some of solid,striped,checkered "
     "(comma-separated), got 'solid,plaid'\n"),
    (["--config.source=meshes", "--config.meshes.glob={tmp}/*.glb"],
     "error: config.meshes.glob '{tmp}/*.glb' matches no file\n"),
    (["--config.output_dir={tmp}/file"],
     "error: {tmp}/file is not a directory (output folder {tmp}/file/tiny)\n"),
])
def test_config_errors_are_one_line_and_write_nothing(tmp_path, args, stderr):
  (tmp_path / "file").write_text("")
  args = [a.format(tmp=tmp_path) for a in args]
  done = _tool(f"--config.output_dir={tmp_path / 'out'}", *args)
  assert (done.returncode, done.stderr, done.stdout) == (1, stderr.format(tmp=tmp_path), "")
  assert sorted(os.listdir(tmp_path)) == ["file"]


def _field(config, field, value):
  *parents, leaf = field.split(".")
  target = config
  for parent in parents:
    target = getattr(target, parent)
  setattr(target, leaf, value)


@pytest.mark.parametrize("changes, message", [
    ({"source": "voxels"}, "config.source must be 'procedural' or 'meshes', got 'voxels'"),
    ({"name": ""}, "config.name must be letters, digits and underscores (the dataset's name), "
     "got ''"),
    ({"seed": -1}, "config.seed must be at least 0, got -1"),
    ({"examples_per_shard": 0}, "config.examples_per_shard must be positive, got 0"),
    ({"file_format": "zip"}, "config.file_format must be one of array_record, tfrecord, "
     "got 'zip'"),
    ({"views.num_orbit_views": 0}, "config.views.num_orbit_views must be positive, got 0"),
    ({"supersample": 0}, "config.supersample must be positive, got 0"),
    ({"batch_size": 0}, "config.batch_size must be positive, got 0"),
    ({"views.num_random_views": -1}, "config.views.num_random_views must be at least 0, got -1"),
    ({"views.fov_degrees": 180.0}, "config.views.fov_degrees must be in (0, 180) degrees, "
     "got 180.0"),
    ({"views.fov_degrees": 170.0}, "config.views.fov_degrees is too wide for views.radius=0 "
     "(the cameras would sit in the box), got 170.0"),
    ({"views.radius": math.nan}, "config.views.radius must be 0 (the distance that keeps the "
     "whole [-1, 1]^3 box in view) or more than 1.742, outside that box, got nan"),
    ({"views.random_elevation_max": 2.0}, "config.views.random_elevation_max must be in "
     "(-pi/2, pi/2) radians, got 2.0"),
    ({"views.orbit_elevation_min": 1.0}, "config.views.orbit_elevation_min must not exceed "
     "config.views.orbit_elevation_max (0.7853981633974483), got 1.0"),
    ({"procedural.max_primitives": 0}, "config.procedural.max_primitives must be positive, got 0"),
    ({"procedural.patterns": " , "}, "config.procedural.patterns must list some of "
     "solid,striped,checkered (comma-separated), got ' , '"),
    ({"source": "meshes"}, "config.meshes.glob must give the mesh files, e.g. "
     "'meshes/**/*.glb' (comma-separated globs), got ''"),
    ({"source": "meshes", "meshes.glob": "*.py", "meshes.up_axis": "x"},
     "config.meshes.up_axis must be 'y' or 'z', got 'x'"),
    ({"source": "meshes", "meshes.glob": "*.py", "meshes.texture_size": 0},
     "config.meshes.texture_size must be positive, got 0"),
    ({"source": "meshes", "meshes.glob": "*.py", "meshes.captions_file": "{tmp}/captions.json"},
     "config.meshes.captions_file {tmp}/captions.json must hold a JSON object "
     "{{file path or stem: caption}}"),
])
def test_every_config_field_is_checked_up_front(tmp_path, changes, message):
  (tmp_path / "captions.json").write_text('["a list"]')
  config = _tiny(tmp_path / "out")
  for field, value in changes.items():
    _field(config, field, value.format(tmp=tmp_path) if isinstance(value, str) else value)
  with pytest.raises(ValueError) as error:
    render_orbits.render_dataset(config)
  assert str(error.value) == message.format(tmp=tmp_path)
  assert not (tmp_path / "out").exists()


def test_a_missing_captions_file_is_named(tmp_path):
  config = _tiny(tmp_path / "out", source="meshes")
  config.meshes.glob = "*.py"
  config.meshes.captions_file = str(tmp_path / "none.json")
  with pytest.raises(FileNotFoundError) as error:
    render_orbits.render_dataset(config)
  assert str(error.value) == f"config.meshes.captions_file: no such file {tmp_path}/none.json"
  assert not (tmp_path / "out").exists()


def test_a_crash_before_the_first_shard_leaves_nothing(tmp_path, monkeypatch):
  def failing(config, indices):
    raise RuntimeError("renderer bug")
  monkeypatch.setattr(render_orbits, "_render_procedural", failing)
  with pytest.raises(RuntimeError, match="renderer bug"):
    render_orbits.render_dataset(_tiny(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def _bad_meshes(folder):
  folder.mkdir()
  (folder / "a_junk.glb").write_bytes(b"not a glb file at all")
  (folder / "b_points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
  return [str(folder / "a_junk.glb"), str(folder / "b_points.obj")]


def test_bad_mesh_files_are_skipped_with_a_warning_or_stop_a_strict_run(tmp_path, caplog):
  junk, points = _bad_meshes(tmp_path / "meshes")
  trimesh.creation.icosphere(subdivisions=1).export(str(tmp_path / "meshes" / "c_ball.ply"))
  config = _tiny(tmp_path / "out", source="meshes", name="meshes", num_assets=0,
                 resolution=16, progress=False)
  config.meshes.glob = str(tmp_path / "meshes" / "*")
  with caplog.at_level(logging.WARNING, logger=render_orbits.__name__):
    folder = render_orbits.render_dataset(config)
  assert [r.message for r in caplog.records] == [
      f"Skipping mesh 0: {junk}: incorrect header on GLB file",
      f"Skipping mesh 1: {points}: no triangles",
      "Skipped 2 of 3 mesh files that could not be loaded "
      "(config.meshes.strict=True stops at the first)"]
  assert [r.asset_id for r in _read(folder)] == ["c_ball"]
  with open(os.path.join(folder, "vf3d_manifest.json")) as file:
    complete = json.load(file)["complete"]
  assert [(v["num_examples"], v.get("skipped", 0))
          for v in complete.values()] == [(0, 2), (1, 0)]
  strict = _tool("--config.meshes.strict=True", "--config.progress=False",
                 f"--config.meshes.glob={tmp_path / 'meshes' / '*'}",
                 f"--config.output_dir={tmp_path / 'strict'}", variant="meshes")
  assert (strict.returncode, strict.stderr) == (
      1, f"error: bad mesh {junk}: incorrect header on GLB file "
      "(config.meshes.strict=False skips such files)\n")
  assert not (tmp_path / "strict").exists()


def test_no_loadable_mesh_is_an_error(tmp_path):
  _bad_meshes(tmp_path / "meshes")
  config = _tiny(tmp_path / "out", source="meshes", name="meshes", num_assets=0, progress=False)
  config.meshes.glob = str(tmp_path / "meshes" / "*")
  with pytest.raises(ValueError, match=r"^none of the 2 mesh files could be loaded"):
    render_orbits.render_dataset(config)
