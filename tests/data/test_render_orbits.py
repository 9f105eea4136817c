"""End to end: procedural assets and real mesh files -> records -> loader."""

import importlib.util
import os
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


def test_procedural_dataset_renders_resumes_and_loads(tmp_path, monkeypatch):
  reference_folder = render_orbits.render_dataset(_tiny(tmp_path / "reference"))
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
  with pytest.raises(KeyboardInterrupt):
    render_orbits.render_dataset(_tiny(tmp_path / "resumed"))
  monkeypatch.setattr(render_orbits, "_render_procedural", real_render)
  folder = render_orbits.render_dataset(_tiny(tmp_path / "resumed"))
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
  got = {r.asset_id: r for r in _read(render_orbits.render_dataset(config))}
  assert sorted(got) == ["box", "cone", "sphere"]
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


def test_command_line(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "tools.render_orbits", "--config", "configs/render.py:tiny",
       "--config.num_assets=2", "--config.resolution=16", f"--config.output_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert len(_read(tmp_path / "tiny" / "1.0.0")) == 2
  typo = subprocess.run(
      [sys.executable, "-m", "tools.render_orbits", "--config", "configs/render.py:tiny",
       "--config.num_asset=2", f"--config.output_dir={tmp_path / 'typo'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert typo.returncode != 0 and "num_asset" in typo.stderr
  assert not (tmp_path / "typo").exists()
