"""Surface samplers against implicit surfaces, analytic areas and trimesh's
sampler; Chamfer / F-score against brute force; IoU and frames by hand."""

import math

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from vf3d_jax.data import procedural
from vf3d_jax.data import views
from vf3d_jax.evaluation import geometry

KINDS = ("sphere", "box", "cylinder", "cone", "torus")
MINOR = 0.3


def _residual(kind, minor, p):
  """``[N]`` signed distance-like function of the unit shape: < 0 inside,
  0 on the surface (written from the unit shapes' definitions)."""
  radial = np.hypot(p[:, 0], p[:, 1])
  z = p[:, 2]
  if kind == "sphere":
    return np.linalg.norm(p, axis=-1) - 1.0
  if kind == "box":
    return np.max(np.abs(p), axis=-1) - 1.0
  if kind == "cylinder":
    return np.maximum(radial - 1.0, np.abs(z) - 1.0)
  if kind == "cone":
    # Distance to the lateral line is (radial - (1 - z) / 2) * 2 / sqrt(5).
    return np.maximum((radial - (1.0 - z) / 2.0) * 2.0 / math.sqrt(5.0), -1.0 - z)
  return np.hypot(radial - 1.0, z) - minor


def _to_local(primitive, world):
  linear = primitive.rotation @ np.diag(primitive.scale)
  return (np.asarray(world, np.float64) - primitive.center) @ np.linalg.inv(linear).T


def _primitive(kind, rotation, scale, center=(0.0, 0.0, 0.0)):
  return procedural.Primitive(
      kind=kind, center=np.asarray(center, np.float64), rotation=np.asarray(rotation),
      scale=np.asarray(scale, np.float64), color_a=np.ones(3), color_b=np.ones(3),
      torus_minor=MINOR if kind == "torus" else 0.0)


def _asset(*primitives):
  return procedural.ProceduralAsset("test", "", tuple(primitives))


def _random_primitive(kind, seed):
  rng = np.random.default_rng(seed)
  rotation = Rotation.random(random_state=seed).as_matrix()
  return _primitive(kind, rotation, rng.uniform(0.3, 1.2, size=3), rng.uniform(-0.5, 0.5, 3))


def _unit_mesh(kind):
  """A fine tessellation of the unit shape (vertices on the exact surface)."""
  if kind == "sphere":
    return trimesh.creation.icosphere(subdivisions=5)
  if kind == "box":
    return trimesh.creation.box(extents=(2.0, 2.0, 2.0))
  if kind == "cylinder":
    return trimesh.creation.cylinder(radius=1.0, height=2.0, sections=256)
  if kind == "cone":
    mesh = trimesh.creation.cone(radius=1.0, height=2.0, sections=256)
    mesh.apply_translation([0.0, 0.0, -1.0])  # apex at z = 1, base at z = -1
    return mesh
  return trimesh.creation.torus(1.0, MINOR, major_sections=256, minor_sections=128)


def _assert_same_moments(a, b, sigmas=5.0):
  """The means and second moments of two point sets agree within ``sigmas``
  standard errors."""
  def features(x):
    x = np.asarray(x, np.float64)
    i, j = np.triu_indices(3)
    return np.concatenate([x, x[:, i] * x[:, j]], axis=1)
  fa, fb = features(a), features(b)
  error = np.sqrt(fa.var(0) / len(fa) + fb.var(0) / len(fb))
  z = np.abs(fa.mean(0) - fb.mean(0)) / error
  assert np.all(z < sigmas), z


@pytest.mark.parametrize("kind", KINDS)
def test_procedural_samples_on_surface(kind):
  primitive = _random_primitive(kind, seed=KINDS.index(kind))
  points = geometry.sample_procedural_surface(_asset(primitive), 5000, seed=0)
  assert points.shape == (5000, 3) and points.dtype == np.float32
  residual = _residual(kind, MINOR, _to_local(primitive, points))
  assert np.max(np.abs(residual)) < 1e-5
  assert len(np.unique(points, axis=0)) == len(points)  # no repeated points


@pytest.mark.parametrize("kind", KINDS)
def test_procedural_matches_trimesh_sampler(kind):
  """Uniform by world area: same moments as trimesh's sampler on the same
  affine image of a tessellated unit shape, and the same area."""
  primitive = _random_primitive(kind, seed=10 + KINDS.index(kind))
  mesh = _unit_mesh(kind)
  mesh.apply_transform(primitive.local_to_world())
  reference, _ = trimesh.sample.sample_surface(mesh, 40000, seed=1)
  points = geometry.sample_procedural_surface(_asset(primitive), 40000, seed=2)
  _assert_same_moments(points, reference)
  area = geometry.procedural_surface_area(_asset(primitive))
  np.testing.assert_allclose(area, mesh.area, rtol=5e-3)


def test_box_face_fractions():
  a, b, c = 0.3, 0.7, 1.2
  primitive = _primitive("box", Rotation.random(random_state=3).as_matrix(), (a, b, c))
  count = 40000
  local = _to_local(primitive, geometry.sample_procedural_surface(_asset(primitive), count, 4))
  axis = np.argmax(np.abs(local), axis=-1)
  face = 2 * axis + (local[np.arange(count), axis] > 0)
  observed = np.bincount(face, minlength=6)
  face_area = np.repeat([4 * b * c, 4 * c * a, 4 * a * b], 2)
  expected = face_area / (8 * (a * b + b * c + c * a))
  np.testing.assert_allclose(face_area.sum(), 8 * (a * b + b * c + c * a))
  assert np.all(np.abs(observed - count * expected)
                < 5 * np.sqrt(count * expected * (1 - expected))), (observed, count * expected)


@pytest.mark.parametrize("kind", ["cylinder", "cone"])
def test_side_and_cap_split(kind):
  a, c = 0.4, 1.1  # radius a, height 2 c
  primitive = _primitive(kind, Rotation.random(random_state=5).as_matrix(), (a, a, c))
  count = 40000
  local = _to_local(primitive, geometry.sample_procedural_surface(_asset(primitive), count, 6))
  if kind == "cylinder":
    side_area, cap_area = 4 * math.pi * a * c, 2 * math.pi * a * a
    on_caps = np.abs(np.abs(local[:, 2]) - 1) < 1e-5
  else:
    side_area, cap_area = math.pi * a * math.sqrt(a * a + 4 * c * c), math.pi * a * a
    on_caps = np.abs(local[:, 2] + 1) < 1e-5
  p = cap_area / (side_area + cap_area)
  assert abs(on_caps.sum() - count * p) < 5 * math.sqrt(count * p * (1 - p))
  area = geometry.procedural_surface_area(_asset(primitive))
  np.testing.assert_allclose(area, side_area + cap_area, rtol=5e-3)


def test_analytic_areas():
  rotation = Rotation.random(random_state=7).as_matrix()
  a, b, c, s = 0.3, 0.7, 1.2, 0.8
  cases = [
      (_primitive("box", rotation, (a, b, c)), 8 * (a * b + b * c + c * a)),
      (_primitive("sphere", rotation, (s, s, s)), 4 * math.pi * s * s),
      (_primitive("torus", rotation, (s, s, s)), 4 * math.pi**2 * s * (MINOR * s)),
  ]
  for primitive, expected in cases:
    np.testing.assert_allclose(geometry.procedural_surface_area(_asset(primitive)),
                               expected, rtol=5e-3, err_msg=primitive.kind)


def test_union_of_overlapping_boxes():
  """Boxes [-1, 1]^3 and [0, 2] x [-1, 1]^2: the union [-1, 2] x [-1, 1]^2.

  Their y and z faces overlap on [0, 1] (coincident, facing the same way):
  sampled once, so the union's y and z faces get their plain area share.
  """
  asset = _asset(_primitive("box", np.eye(3), (1, 1, 1)),
                 _primitive("box", np.eye(3), (1, 1, 1), center=(1, 0, 0)))
  np.testing.assert_allclose(geometry.procedural_surface_area(asset), 32.0, rtol=5e-3)
  count = 32000
  points = geometry.sample_procedural_surface(asset, count, seed=8)
  x = points[:, 0]
  for axis, plane, area in ((0, -1.0, 4), (0, 2.0, 4), (1, 1.0, 6), (2, -1.0, 6)):
    p = area / 32
    observed = np.sum(np.abs(points[:, axis] - plane) < 1e-6)
    assert abs(observed - count * p) < 5 * math.sqrt(count * p * (1 - p)), (axis, plane)
  # Uniform along x on a shared face, overlap included: [0, 1] holds 1/3.
  top = np.abs(points[:, 2] - 1) < 1e-6
  p = 1 / 3
  assert (abs(np.sum(top & (x > 0) & (x < 1)) - top.sum() * p)
          < 5 * math.sqrt(top.sum() * p * (1 - p)))
  # The inner faces x = 0 and x = 1 are inside the other box.
  inner = (np.abs(x) < 1e-6) | (np.abs(x - 1) < 1e-6)
  assert not np.any(inner & (np.max(np.abs(points[:, 1:]), axis=-1) < 1 - 1e-6))


def test_union_of_overlapping_cylinders():
  """Two upright cylinders of one height whose discs overlap: flat faces are
  the union of the discs (coincident lens sampled once), sides the arcs
  outside the other disc."""
  r1, r2, d, c = 1.0, 0.6, 1.1, 0.4
  asset = _asset(_primitive("cylinder", np.eye(3), (r1, r1, c)),
                 _primitive("cylinder", Rotation.from_euler("z", 0.7).as_matrix(), (r2, r2, c),
                            center=(d, 0, 0)))
  alpha1 = math.acos((d * d + r1 * r1 - r2 * r2) / (2 * d * r1))
  alpha2 = math.acos((d * d + r2 * r2 - r1 * r1) / (2 * d * r2))
  # Circular segments r^2 (alpha - sin(2 alpha) / 2) of each disc inside the other.
  lens = (r1 * r1 * (alpha1 - math.sin(2 * alpha1) / 2)
          + r2 * r2 * (alpha2 - math.sin(2 * alpha2) / 2))
  discs = math.pi * (r1 * r1 + r2 * r2) - lens
  sides = 2 * c * (r1 * (2 * math.pi - 2 * alpha1) + r2 * (2 * math.pi - 2 * alpha2))
  np.testing.assert_allclose(geometry.procedural_surface_area(asset), 2 * discs + sides,
                             rtol=5e-3)
  count = 32000
  points = geometry.sample_procedural_surface(asset, count, seed=10)
  p = discs / (2 * discs + sides)
  observed = np.sum(np.abs(points[:, 2] + c) < 1e-6)
  assert abs(observed - count * p) < 5 * math.sqrt(count * p * (1 - p))


def test_union_of_touching_boxes_drops_contact_patch():
  """A 1 x 1 x 2 box standing on [-1, 1]^3: the 1 x 1 contact patch at z = 1
  belongs to neither surface; union area 24 + 10 - 2."""
  asset = _asset(_primitive("box", np.eye(3), (1, 1, 1)),
                 _primitive("box", np.eye(3), (0.5, 0.5, 1), center=(0, 0, 2)))
  np.testing.assert_allclose(geometry.procedural_surface_area(asset), 32.0, rtol=5e-3)
  count = 32000
  points = geometry.sample_procedural_surface(asset, count, seed=9)
  on_top = np.abs(points[:, 2] - 1) < 1e-6
  in_patch = np.max(np.abs(points[:, :2]), axis=-1) < 0.5
  assert not np.any(on_top & in_patch)
  p = 3 / 32  # the rest of the lower box's top face
  assert abs(np.sum(on_top) - count * p) < 5 * math.sqrt(count * p * (1 - p))


# Seed 0's assets 122, 507 and 1257 have side parts that interpenetrate.
@pytest.mark.parametrize("seed,indices", [(3, range(16)), (0, (122, 507, 1257))])
def test_generated_assets_samples_on_union_surface(seed, indices):
  checked = 0
  for index in indices:
    asset = procedural.sample_asset(seed=seed, index=index)
    if len(asset.primitives) < 2:
      continue
    checked += 1
    points = geometry.sample_procedural_surface(asset, 4000, seed=index)
    residuals = np.stack([_residual(p.kind, p.torus_minor, _to_local(p, points))
                          for p in asset.primitives])
    # Every point is on some primitive and strictly inside none.
    assert np.all(np.min(np.abs(residuals), axis=0) < 1e-5), asset.caption
    assert np.all(residuals > -1e-5), asset.caption
  assert checked >= min(8, len(indices))


def test_procedural_sampler_deterministic():
  asset = procedural.sample_asset(seed=0, index=5)
  first = geometry.sample_procedural_surface(asset, 1000, seed=11)
  np.testing.assert_array_equal(first, geometry.sample_procedural_surface(asset, 1000, seed=11))
  assert not np.array_equal(first, geometry.sample_procedural_surface(asset, 1000, seed=12))
  assert (geometry.procedural_surface_area(asset, seed=1)
          == geometry.procedural_surface_area(asset, seed=1))
  assert geometry.sample_procedural_surface(asset, 0, seed=0).shape == (0, 3)


def _distance_to_triangles(points, corners):
  """``[N]`` brute-force distance from points to the nearest triangle."""
  best = np.full(len(points), np.inf)
  for a, b, c in corners.astype(np.float64):
    # Closest point on the triangle by clamping barycentrics, via projection
    # onto the plane then onto the edges when outside.
    normal = np.cross(b - a, c - a)
    normal /= np.linalg.norm(normal)
    height = (points - a) @ normal
    foot = points - height[:, None] * normal
    m = np.stack([b - a, c - a], 1)
    uv = np.linalg.lstsq(m, (foot - a).T, rcond=None)[0].T
    inside = (uv[:, 0] >= -1e-9) & (uv[:, 1] >= -1e-9) & (uv.sum(1) <= 1 + 1e-9)
    distance = np.where(inside, np.abs(height), np.inf)
    for p, q in ((a, b), (b, c), (c, a)):
      t = np.clip((points - p) @ (q - p) / np.dot(q - p, q - p), 0, 1)
      distance = np.minimum(distance, np.linalg.norm(points - p - t[:, None] * (q - p), axis=1))
    best = np.minimum(best, distance)
  return best


def test_mesh_sampler_matches_trimesh():
  # Triangles of very different sizes: a flat box and a thin, tall cone.
  mesh = trimesh.util.concatenate([
      trimesh.creation.box(extents=(1.6, 1.0, 0.2)),
      trimesh.creation.cone(radius=0.2, height=1.5, sections=12).apply_translation([0.5, 0, 0.1])])
  points = geometry.sample_mesh_surface(mesh.vertices, mesh.faces, 40000, seed=0)
  assert points.shape == (40000, 3) and points.dtype == np.float32
  reference, _ = trimesh.sample.sample_surface(mesh, 40000, seed=1)
  _assert_same_moments(points, reference)
  assert np.max(_distance_to_triangles(points[:2000], mesh.triangles)) < 1e-6
  np.testing.assert_array_equal(
      points, geometry.sample_mesh_surface(mesh.vertices, mesh.faces, 40000, seed=0))
  np.testing.assert_array_equal(
      geometry.sample_triangle_surface(mesh.triangles, 100, seed=3),
      geometry.sample_mesh_surface(mesh.vertices, mesh.faces, 100, seed=3))
  empty = geometry.sample_mesh_surface(np.zeros((0, 3)), np.zeros((0, 3), int), 10, seed=0)
  assert empty.shape == (0, 3)


def _brute_force_metrics(pred, true, thresholds):
  d = np.linalg.norm(pred[:, None] - true[None], axis=-1)
  to_true, to_pred = d.min(1), d.min(0)
  out = {"accuracy": to_true.mean(), "completeness": to_pred.mean(),
         "chamfer": (to_true.mean() + to_pred.mean()) / 2}
  for tau in thresholds:
    p, r = np.mean(to_true < tau), np.mean(to_pred < tau)
    out[f"precision@{tau}"], out[f"recall@{tau}"] = p, r
    out[f"fscore@{tau}"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
  return out


def test_chamfer_and_fscore_brute_force():
  rng = np.random.default_rng(0)
  pred = rng.uniform(size=(200, 3))
  true = rng.uniform(size=(300, 3)) + 0.05
  thresholds = (0.05, 0.1, 0.2)
  metrics = geometry.chamfer_and_fscore(pred, true, thresholds)
  expected = _brute_force_metrics(pred, true, thresholds)
  assert set(metrics) == set(expected) | {"empty_prediction"}
  assert metrics["empty_prediction"] is False
  for key, value in expected.items():
    assert abs(metrics[key] - value) < 1e-6, key
  assert 0 < metrics["fscore@0.1"] < 1


def test_chamfer_and_fscore_by_hand():
  grid = np.stack(np.meshgrid(*[np.arange(4.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
  same = geometry.chamfer_and_fscore(grid, grid)
  assert same["chamfer"] == 0 and same["fscore@0.05"] == 1 and same["fscore@0.1"] == 1
  shifted = geometry.chamfer_and_fscore(grid + [0.07, 0, 0], grid)
  np.testing.assert_allclose([shifted["accuracy"], shifted["completeness"], shifted["chamfer"]],
                             0.07, rtol=1e-9)
  assert shifted["fscore@0.05"] == 0 and shifted["precision@0.05"] == 0
  assert shifted["fscore@0.1"] == 1 and shifted["recall@0.1"] == 1
  empty = geometry.chamfer_and_fscore(np.zeros((0, 3)), grid)
  assert empty["empty_prediction"] is True and math.isnan(empty["chamfer"])
  assert empty["fscore@0.05"] == 0 and empty["recall@0.1"] == 0
  with pytest.raises(ValueError):
    geometry.chamfer_and_fscore(grid, np.zeros((0, 3)))


def test_silhouette_iou_by_hand():
  pred = np.zeros((3, 3, 4), np.float32)
  true = np.zeros((3, 3, 4), np.float32)
  pred[0, 0, :3] = 1.0  # 3 pixels
  true[0, 0, 1:] = 0.9  # 3 pixels, 2 shared -> 2 / 4
  pred[1, :2, :2] = 0.6  # 4 pixels
  true[1, 1:, 1:] = 1.0  # 6 pixels, 1 shared -> 1 / 9
  true[1, 0, 0] = 0.5  # exactly the threshold: not covered
  # Image 2 is empty in both: 1.
  iou = geometry.silhouette_iou(pred, true)
  assert iou.shape == (3,) and iou.dtype == np.float32
  np.testing.assert_allclose(iou, [0.5, 1 / 9, 1.0], rtol=1e-6)
  np.testing.assert_allclose(geometry.silhouette_iou(pred, true, threshold=0.95), [0, 0, 1])


def test_mesh_to_world_inverts_canonicalisation():
  rng = np.random.default_rng(0)
  c2w = np.tile(np.eye(4), (3, 1, 1))
  c2w[:, :3, :3] = Rotation.random(3, random_state=1).as_matrix()
  c2w[:, :3, 3] = rng.normal(size=(3, 3)) * 2.5
  _, world_transform, scale = views.canonicalize_cameras(c2w, source_index=1)
  world = rng.uniform(-1, 1, size=(50, 3))
  model = world @ world_transform[:3, :3].T + world_transform[:3, 3]
  np.testing.assert_allclose(np.linalg.norm(model[0] - model[1]),
                             scale * np.linalg.norm(world[0] - world[1]), rtol=1e-9)
  back = geometry.mesh_to_world(model, world_transform)
  assert back.dtype == np.float32
  np.testing.assert_allclose(back, world, atol=1e-6)
