"""Tests of density grids, marching cubes and mesh export."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from vf3d_jax.inference import mesh as mesh_lib
from vf3d_jax.inference.mesh import (EmptyMeshError, Mesh, density_grid, export_mesh,
                                     extract_mesh, field_query_fn, mesh_from_grid)
from vf3d_jax.models.triplane import TriplaneDecoder, density_rgb

CENTRE = np.array([0.35, -0.2, 0.1], np.float32)
RADII = np.array([0.45, 0.3, 0.2], np.float32)  # distinct per axis


@jax.jit
def _ellipsoid(points):
  """Density 2 at the centre of an off-centre ellipsoid, 1 on its surface."""
  scaled = jnp.linalg.norm((points - CENTRE) / RADII, axis=-1)
  rgb = jnp.clip((points + 1.0) / 2.0, 0.0, 1.0)
  return 2.0 - scaled, rgb


@jax.jit
def _sphere(points):
  """Density 1 on the sphere of radius 0.6 about the origin."""
  return 1.6 - jnp.linalg.norm(points, axis=-1), (points + 1.0) / 2.0


def test_density_grid_is_ij_over_linspace():
  resolution = 16
  grid = density_grid(_ellipsoid, resolution, chunk=1000)  # 4096 = 4 x 1000 + padding
  axis = np.linspace(-1, 1, resolution)
  x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
  expected = 2.0 - np.sqrt(((x - CENTRE[0]) / RADII[0]) ** 2 + ((y - CENTRE[1]) / RADII[1]) ** 2
                           + ((z - CENTRE[2]) / RADII[2]) ** 2)
  assert grid.shape == (16, 16, 16) and grid.dtype == np.float32
  np.testing.assert_allclose(grid, expected, atol=1e-5)


def test_sphere_vertices_on_the_radius_with_their_colours():
  resolution = 64
  voxel = 2.0 / (resolution - 1)
  mesh = extract_mesh(_sphere, resolution, threshold=1.0, chunk=64 * 64 * 16)
  assert mesh.vertices.dtype == np.float32 and mesh.vertex_colors.dtype == np.float32
  assert mesh.faces.shape[1] == 3 and mesh.faces.max() < len(mesh.vertices)
  radius = np.linalg.norm(mesh.vertices, axis=-1)
  assert np.abs(radius - 0.6).max() < 0.1 * voxel
  np.testing.assert_allclose(mesh.vertex_colors, (mesh.vertices + 1) / 2, atol=1e-6)
  # Outward faces: marching cubes of a density (high inside) gives positive volume.
  solid = trimesh.Trimesh(mesh.vertices, mesh.faces)
  assert solid.volume == pytest.approx(4 / 3 * np.pi * 0.6 ** 3, rel=0.01)


def test_axis_order_of_an_off_centre_ellipsoid():
  resolution = 48
  voxel = 2.0 / (resolution - 1)
  mesh = extract_mesh(_ellipsoid, resolution, chunk=48 * 48 * 48)
  low, high = mesh.vertices.min(0), mesh.vertices.max(0)
  np.testing.assert_allclose((low + high) / 2, CENTRE, atol=voxel)
  np.testing.assert_allclose((high - low) / 2, RADII, atol=voxel)
  # Vertices satisfy the ellipsoid equation in (x, y, z) order.
  level = np.linalg.norm((mesh.vertices - CENTRE) / RADII, axis=-1)
  assert np.abs(level - 1.0).max() < 0.1


def test_empty_surface_is_an_error(tmp_path):
  with pytest.raises(EmptyMeshError, match="threshold 5"):
    extract_mesh(_sphere, 8, threshold=5.0)
  with pytest.raises(EmptyMeshError):
    mesh_from_grid(np.zeros((8, 8, 8), np.float32), None, threshold=1.0)
  with pytest.raises(ValueError, match="NaN"):
    mesh_from_grid(np.full((8, 8, 8), np.nan, np.float32))
  empty = Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64),
               np.zeros((0, 3), np.float32))
  with pytest.raises(EmptyMeshError):
    export_mesh(empty, tmp_path / "empty.obj")
  assert not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def sphere_mesh():
  return extract_mesh(_sphere, 20, chunk=20 ** 3)


@pytest.mark.parametrize("extension", [".obj", ".glb", ".ply"])
def test_export_round_trip(sphere_mesh, extension, tmp_path):
  path = tmp_path / "out" / f"sphere{extension}"
  assert export_mesh(sphere_mesh, path) == [str(path)]
  assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary left
  loaded = trimesh.load(path, force="mesh")
  merged = trimesh.Trimesh(sphere_mesh.vertices, sphere_mesh.faces, process=True)
  assert len(loaded.vertices) == len(merged.vertices)
  assert len(loaded.faces) == len(sphere_mesh.faces)
  assert loaded.visual.kind == "vertex"
  colors = loaded.visual.vertex_colors
  assert colors.dtype == np.uint8 and colors.shape == (len(loaded.vertices), 4)
  # Match vertices by position: the colour is (v + 1) / 2 in 8 bits.
  _, nearest = cKDTree(sphere_mesh.vertices).query(loaded.vertices)
  expected = np.round(sphere_mesh.vertex_colors[nearest] * 255)
  np.testing.assert_allclose(colors[:, :3], expected, atol=1)
  assert (colors[:, 3] == 255).all()
  np.testing.assert_allclose(loaded.vertices, sphere_mesh.vertices[nearest], atol=1e-5)


def test_export_failures_leave_no_file(sphere_mesh, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="unknown mesh format '.stl'"):
    export_mesh(sphere_mesh, tmp_path / "mesh.stl")
  target = tmp_path / "mesh.obj"
  target.write_text("previous")

  def broken_replace(source, destination):
    raise OSError("disk full")

  monkeypatch.setattr(mesh_lib.os, "replace", broken_replace)
  with pytest.raises(OSError, match="disk full"):
    export_mesh(sphere_mesh, target)
  assert os.listdir(tmp_path) == ["mesh.obj"]  # temporary removed
  assert target.read_text() == "previous"  # the old file is untouched


def test_field_query_fn_with_a_small_decoder():
  key_planes, key_decoder = jax.random.split(jax.random.PRNGKey(0))
  planes = jax.random.normal(key_planes, (3, 8, 8, 6))
  variables = TriplaneDecoder(hidden=16).init(key_decoder, jnp.zeros((1, 18)))
  query = field_query_fn(variables, planes)
  reference = jax.jit(density_rgb)  # independent of the chunking under test

  resolution = 10
  grid = density_grid(query, resolution, chunk=300)
  axis = np.linspace(-1, 1, resolution, dtype=np.float32)
  points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
  expected, _ = reference(variables["params"], planes[None], jnp.asarray(points)[None])
  np.testing.assert_allclose(grid, np.asarray(expected[0]).reshape(grid.shape), atol=1e-5)

  threshold = float(np.median(grid))
  mesh = mesh_from_grid(grid, query, threshold, chunk=256)
  assert len(mesh.faces) > 0
  _, rgb = reference(variables["params"], planes[None], jnp.asarray(mesh.vertices)[None])
  np.testing.assert_allclose(mesh.vertex_colors, np.clip(np.asarray(rgb[0]), 0, 1), atol=1e-5)


def test_density_grid_progress_bar(capsys):
  quiet = density_grid(_sphere, 8, chunk=100)  # stderr is not a terminal here: no bar
  assert capsys.readouterr().err == ""
  shown = density_grid(_sphere, 8, chunk=100, progress=True)
  err = capsys.readouterr().err
  assert "mesh grid:" in err and "/6 " in err, err  # 512 points in chunks of 100
  np.testing.assert_array_equal(quiet, shown)
  density_grid(_sphere, 8, chunk=100, progress=False)
  assert capsys.readouterr().err == ""
