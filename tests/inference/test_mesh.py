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


@jax.jit
def _steep_sphere(points):
  """Density 1 on a sphere of radius 0.6 a little off the origin, falling 8 per unit outward."""
  centre = jnp.array([0.05, -0.03, 0.02])
  return 1.0 + 8.0 * (0.6 - jnp.linalg.norm(points - centre, axis=-1)), (points + 1.0) / 2.0


def _torus_distance(points, centre, major, minor):
  q = points - jnp.asarray(centre)
  ring = jnp.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2) - major
  return jnp.sqrt(ring ** 2 + q[:, 2] ** 2) - minor


@jax.jit
def _thin_pieces(points):
  """Four pieces: a torus with a tube 0.05 thick, a plate 0.06 thick and two small spheres.

  Density ``1 - 4 * signed distance``: 1 on the surfaces. The tube and the
  plate are thinner than a block of 8 voxels at every resolution tested, so
  the coarse samples often fall on neither side of them.
  """
  distance = jnp.minimum(
      _torus_distance(points, (-0.25, 0.15, 0.05), 0.4, 0.05),
      jnp.minimum(jnp.linalg.norm(points - jnp.array([0.55, -0.5, 0.3]), axis=-1) - 0.09,
                  jnp.linalg.norm(points - jnp.array([0.5, 0.55, -0.45]), axis=-1) - 0.12))
  plate = jnp.maximum(jnp.abs(points[:, 2] + 0.5) - 0.03,
                      jnp.max(jnp.abs(points[:, :2] - jnp.array([-0.2, -0.3])), axis=-1) - 0.3)
  return 1.0 - 4.0 * jnp.minimum(distance, plate), (points + 1.0) / 2.0


def _pieces(mesh):
  return len(trimesh.Trimesh(mesh.vertices, mesh.faces).split(only_watertight=False))


def _chamfer_voxels(a, b, resolution):
  """Symmetric Chamfer distance of two meshes' vertices, in voxels of the grid."""
  from vf3d_jax.evaluation import geometry  # pylint: disable=g-import-not-at-top
  return geometry.chamfer_and_fscore(a.vertices, b.vertices)["chamfer"] / (2 / (resolution - 1))


def _crossed_blocks(grid, coarse, threshold=1.0):
  """Blocks whose full-resolution values straddle ``threshold``: those holding surface."""
  n = len(coarse) - 1
  crossed = np.zeros((n, n, n), bool)
  for a in range(n):
    for b in range(n):
      for c in range(n):
        box = grid[coarse[a]:coarse[a + 1] + 1, coarse[b]:coarse[b + 1] + 1,
                   coarse[c]:coarse[c + 1] + 1]
        crossed[a, b, c] = box.min() < threshold < box.max()
  return crossed


def _straddling_corners(grid, coarse, threshold=1.0):
  """Blocks whose eight coarse corners straddle ``threshold`` (no margin, no dilation)."""
  values = grid[np.ix_(coarse, coarse, coarse)]
  n = len(coarse) - 1
  corners = [values[i:n + i, j:n + j, k:n + k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
  return (np.minimum.reduce(corners) < threshold) & (np.maximum.reduce(corners) > threshold)


def test_coarse_indices_end_with_the_last_grid_point():
  np.testing.assert_array_equal(mesh_lib.coarse_indices(20, 8), [0, 8, 16, 19])
  np.testing.assert_array_equal(mesh_lib.coarse_indices(17, 8), [0, 8, 16])
  indices = mesh_lib.coarse_indices(512, 8)
  assert len(indices) == 65 and indices[-2:].tolist() == [504, 511]  # the last block: 7 intervals


def test_fill_is_trilinear_and_keeps_the_coarse_values():
  from scipy.interpolate import RegularGridInterpolator  # pylint: disable=g-import-not-at-top
  coarse = mesh_lib.coarse_indices(21, 6)  # 0, 6, 12, 18, 20
  values = np.random.default_rng(0).normal(size=(len(coarse),) * 3).astype(np.float32)
  grid = mesh_lib._fill_trilinear(values, coarse)  # pylint: disable=protected-access
  assert grid.shape == (21, 21, 21) and grid.dtype == np.float32
  np.testing.assert_array_equal(grid[np.ix_(coarse, coarse, coarse)], values)
  axis = np.arange(21)
  points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
  expected = RegularGridInterpolator((coarse,) * 3, values.astype(np.float64))(points)
  np.testing.assert_allclose(grid.reshape(-1), expected, atol=1e-5)


@pytest.mark.parametrize("field, max_fraction", [(_steep_sphere, 0.4), (_thin_pieces, 0.28)])
def test_coarse_to_fine_mesh_is_the_full_grid_mesh(field, max_fraction):
  resolution = 160  # 159 intervals: the last block of 8 has 7
  full = extract_mesh(field, resolution, chunk=resolution ** 3)
  sent = []

  def counted(points):
    sent.append(points.shape[0])
    return field(points)

  grid, stats = mesh_lib.density_grid_coarse_to_fine(counted, resolution, 1.0, block=8,
                                                     chunk=2 ** 15)
  fast = mesh_from_grid(grid, field)
  assert _chamfer_voxels(fast, full, resolution) <= 0.5
  assert _pieces(fast) == _pieces(full) == (1 if field is _steep_sphere else 4)
  assert abs(len(fast.faces) - len(full.faces)) <= 0.001 * len(full.faces)
  # The work, counted at the query: 21^3 coarse points, then the marked blocks' points.
  assert stats.coarse_queries == 21 ** 3 and stats.blocks == 20 ** 3
  assert sum(sent) == stats.padded_queries < stats.queries + 2 ** 15 + 21 ** 3
  assert stats.queries < max_fraction * resolution ** 3  # measured: 0.31 and 0.21
  assert stats.surface_blocks < stats.marked_blocks < stats.blocks
  assert stats.marked_fraction == stats.marked_blocks / stats.blocks
  assert "of 4,096,000" in stats.describe()
  # extract_mesh's option gives the same mesh.
  again = extract_mesh(field, resolution, chunk=2 ** 15, coarse_block=8)
  np.testing.assert_array_equal(again.vertices, fast.vertices)


def test_thin_pieces_need_more_than_straddling_corners():
  # The coarse-to-fine test above is not vacuous: the thin parts cross blocks whose
  # corners do not straddle the threshold. Without the margin only the dilation finds them.
  resolution = 160
  full = density_grid(_thin_pieces, resolution, chunk=resolution ** 3)
  coarse = mesh_lib.coarse_indices(resolution, 8)
  missed = _crossed_blocks(full, coarse) & ~_straddling_corners(full, coarse)
  assert missed.sum() >= 5
  grid, _ = mesh_lib.density_grid_coarse_to_fine(_thin_pieces, resolution, 1.0, 8,
                                                 chunk=2 ** 15, margin=0.0)
  for block in np.argwhere(missed):  # queried at full resolution: the full grid's values
    box = tuple(slice(coarse[i], coarse[i + 1] + 1) for i in block)
    np.testing.assert_array_equal(grid[box], full[box])


def test_the_margin_finds_thin_parts_between_coarse_samples():
  # At 48^3 blocks of 8 are a sixth of the box: the sign changes at the coarse samples
  # and the dilation miss parts of the tube and the plate; the margin keeps them.
  resolution = 48
  full = extract_mesh(_thin_pieces, resolution, chunk=resolution ** 3)
  kept = extract_mesh(_thin_pieces, resolution, chunk=4096, coarse_block=8)
  assert _pieces(kept) == _pieces(full) == 4
  assert _chamfer_voxels(kept, full, resolution) <= 0.5
  without = extract_mesh(_thin_pieces, resolution, chunk=4096, coarse_block=8,
                         coarse_margin=0.0)
  assert _pieces(without) < 4 and _chamfer_voxels(without, full, resolution) > 0.5


def test_a_piece_no_coarse_sample_comes_near_is_lost_without_margin():
  # The limit of the method, and proof that the comparison notices a lost piece: a steep
  # ball 2 voxels across, far from the sphere, between coarse samples.
  resolution = 64
  voxel = 2 / (resolution - 1)
  axis = mesh_lib.grid_coordinates(resolution)
  dot = jnp.array([axis[44] + 0.5 * voxel, axis[44] + 0.5 * voxel, axis[12] + 0.5 * voxel])

  @jax.jit
  def field(points):
    ball = 1.0 + 20.0 * (1.2 * voxel - jnp.linalg.norm(points - dot, axis=-1))
    sphere = 1.0 + 20.0 * (0.3 - jnp.linalg.norm(points + 0.4, axis=-1))
    return jnp.maximum(ball, sphere), (points + 1.0) / 2.0

  full = extract_mesh(field, resolution, chunk=resolution ** 3)
  lost = extract_mesh(field, resolution, chunk=4096, coarse_block=8, coarse_margin=0.0)
  # A small lost piece hardly moves the mean (Chamfer) distance; the piece count shows it.
  assert (_pieces(full), _pieces(lost)) == (2, 1)
  assert cKDTree(lost.vertices).query(full.vertices)[0].max() > 10 * voxel
  # Smaller blocks put coarse samples on it.
  found = extract_mesh(field, resolution, chunk=4096, coarse_block=2, coarse_margin=0.0)
  assert _pieces(found) == 2 and _chamfer_voxels(found, full, resolution) <= 0.5


def test_coarse_to_fine_without_a_surface():
  @jax.jit
  def fog(points):
    return jnp.full(points.shape[:1], 0.2), points

  with pytest.raises(EmptyMeshError, match="does not cross threshold 1.0"):
    extract_mesh(fog, 32, chunk=4096, coarse_block=8)
  grid, stats = mesh_lib.density_grid_coarse_to_fine(fog, 32, 1.0, 8, chunk=4096)
  assert stats.fine_queries == 0 and stats.marked_blocks == 0 and stats.coarse_queries == 125
  np.testing.assert_allclose(grid, 0.2, atol=1e-6)
  with pytest.raises(EmptyMeshError):
    extract_mesh(_sphere, 32, threshold=5.0, chunk=4096, coarse_block=8)


def test_coarse_to_fine_arguments_and_progress_bars(capsys):
  for block in (0, 1, 2.5, True):
    with pytest.raises(ValueError, match="block must be an integer >= 2"):
      mesh_lib.density_grid_coarse_to_fine(_sphere, 16, block=block)
  with pytest.raises(ValueError, match="margin must be >= 0"):
    mesh_lib.density_grid_coarse_to_fine(_sphere, 16, margin=-1.0)
  mesh_lib.density_grid_coarse_to_fine(_steep_sphere, 24, 1.0, 8, chunk=1000, progress=True)
  err = capsys.readouterr().err
  assert "mesh grid (coarse):" in err and "mesh grid (fine):" in err, err


@pytest.mark.parametrize("value, ok", [(0, True), (2, True), (8, True), (1, False), (-8, False),
                                       (True, False), (None, False)])
def test_config_checks_coarse_block(value, ok):
  from configs import eval as eval_configs  # pylint: disable=g-import-not-at-top
  from configs import infer as infer_configs  # pylint: disable=g-import-not-at-top
  from vf3d_jax.inference import pipeline  # pylint: disable=g-import-not-at-top
  assert eval_configs.get_config().mesh.coarse_block == 0  # geometry is scored on the full grid
  config = infer_configs.get_config("demo")
  config.preprocess.matting = "builtin"
  assert config.mesh.coarse_block == 8
  config.mesh.coarse_block = value
  if ok:
    pipeline.validate_config(config)
  else:
    with pytest.raises(ValueError) as e:
      pipeline.validate_config(config)
    assert str(e.value) == f"mesh.coarse_block must be 0 (off) or an integer >= 2, got {value!r}"
