"""Geometry of the primitive ray caster against independent numpy references."""

import math

import jax
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from vf3d_jax.data import orbits
from vf3d_jax.data import procedural
from vf3d_jax.data import raytrace


def _pixel_rays(c2w, intrinsics, resolution):
  """Rays through pixel centres, written from the documented convention."""
  fx, fy, cx, cy = intrinsics
  j, i = np.meshgrid(np.arange(resolution), np.arange(resolution))
  x, y = (j + 0.5) / resolution, (i + 0.5) / resolution
  # OpenCV camera frame -> OpenGL: flip y and z.
  local = np.stack([(x - cx) / fx, -(y - cy) / fy, -np.ones_like(x)], -1).reshape(-1, 3)
  directions = local @ np.asarray(c2w, np.float64)[:3, :3].T
  directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
  return np.broadcast_to(np.asarray(c2w, np.float64)[:3, 3], directions.shape), directions


def _render(primitives, c2w, intrinsics, resolution):
  packed = procedural.pack_assets([primitives], len(primitives))
  rgba, depth = raytrace.render_assets(packed, c2w[None], intrinsics[None], resolution, 1)
  return np.asarray(rgba[0]), np.asarray(depth[0])


def _primitive(kind, center=(0, 0, 0), rotation=np.eye(3), scale=(1, 1, 1), minor=0.0):
  return procedural.Primitive(kind=kind, center=np.asarray(center, float),
                              rotation=np.asarray(rotation, float),
                              scale=np.asarray(scale, float), color_a=np.array([0.9, 0.2, 0.1]),
                              color_b=np.array([0.1, 0.2, 0.9]), torus_minor=minor)


def test_sphere_renders_where_and_as_large_as_it_must():
  center, radius, resolution = np.array([0.2, -0.1, 0.15]), 0.6, 48
  c2w, intrinsics = orbits.cameras_from_angles([0.4, 2.0], [0.3, -0.2], 3.0, 50.0)
  rgba, depth = _render([_primitive("sphere", center, scale=(radius,) * 3)], c2w, intrinsics,
                        resolution)
  for view in range(2):
    origins, directions = _pixel_rays(c2w[view], intrinsics[view], resolution)
    to_center = center - origins
    along = np.sum(to_center * directions, -1)
    miss_distance = np.linalg.norm(to_center - along[:, None] * directions, axis=-1)
    expected_hit = miss_distance < radius
    expected_depth = along - np.sqrt(np.maximum(radius**2 - miss_distance**2, 0))
    hit = rgba[view, ..., 3].reshape(-1) > 0
    # Pixel centres right on the rim may go either way.
    clear = np.abs(miss_distance - radius) > 1e-4
    np.testing.assert_array_equal(hit[clear], expected_hit[clear])
    assert expected_hit.sum() > 100
    np.testing.assert_allclose(depth[view].reshape(-1)[expected_hit & clear],
                               expected_depth[expected_hit & clear], rtol=1e-4)
    assert np.all(np.isinf(depth[view].reshape(-1)[~hit]))
    # Colour stays the albedo's hue: shading is a grey factor.
    colors = rgba[view, ..., :3].reshape(-1, 3)[hit]
    hue = colors / np.linalg.norm(colors, axis=-1, keepdims=True)
    albedo = np.array([0.9, 0.2, 0.1]) / np.linalg.norm([0.9, 0.2, 0.1])
    assert np.all(hue @ albedo > 0.9999)


_INSIDE = {
    "sphere": lambda p, r: np.sum(p * p, -1) <= 1,
    "box": lambda p, r: np.max(np.abs(p), -1) <= 1,
    "cylinder": lambda p, r: (p[..., 0]**2 + p[..., 1]**2 <= 1) & (np.abs(p[..., 2]) <= 1),
    "cone": lambda p, r: (np.abs(p[..., 2]) <= 1)
                         & (np.hypot(p[..., 0], p[..., 1]) <= (1 - p[..., 2]) / 2),
    "torus": lambda p, r: (np.hypot(p[..., 0], p[..., 1]) - 1)**2 + p[..., 2]**2 <= r * r,
}


@pytest.mark.parametrize("kind", sorted(_INSIDE))
def test_primitive_hits_match_a_brute_force_march(kind):
  rng = np.random.default_rng(7)
  rotation = Rotation.from_rotvec(rng.normal(size=3)).as_matrix()
  primitive = _primitive(kind, center=(0.1, -0.2, 0.05), rotation=rotation,
                         scale=(0.7, 0.5, 0.6), minor=0.35 if kind == "torus" else 0.0)
  resolution = 32
  c2w, intrinsics = orbits.cameras_from_angles([1.1], [0.35], 2.5, 50.0)
  rgba, depth = _render([primitive], c2w, intrinsics, resolution)
  origins, directions = _pixel_rays(c2w[0], intrinsics[0], resolution)
  to_local = np.linalg.inv(primitive.local_to_world())
  step = 5e-4
  ts = np.arange(1.0, 4.0, step)
  points = origins[:, None] + ts[None, :, None] * directions[:, None]
  local = points @ to_local[:3, :3].T + to_local[:3, 3]
  inside = _INSIDE[kind](local, primitive.torus_minor)
  expected_hit = inside.any(axis=1)
  expected_depth = ts[np.argmax(inside, axis=1)]
  hit = rgba[0, ..., 3].reshape(-1) > 0
  assert expected_hit.sum() > 50
  # Only grazing rays (inside for less than the march step) may disagree.
  assert np.sum(hit != expected_hit) <= 2
  both = hit & expected_hit
  got = depth[0].reshape(-1)[both]
  assert np.all(got <= expected_depth[both] + 1e-4)
  assert np.all(got >= expected_depth[both] - step - 1e-4)


def test_normals_face_the_camera_and_are_unit():
  primitives = [_primitive("torus", (0.3, 0, 0), scale=(0.5,) * 3, minor=0.3),
                _primitive("cone", (-0.4, 0.2, 0.1), scale=(0.4, 0.4, 0.6)),
                _primitive("box", (0, -0.5, -0.3), scale=(0.3, 0.2, 0.25))]
  packed = procedural.pack_assets([primitives], 3)
  c2w, intrinsics = orbits.cameras_from_angles([0.7], [0.5], 3.0, 50.0)
  origins, directions = _pixel_rays(c2w[0], intrinsics[0], 24)
  out = raytrace.trace_rays(jax.tree.map(lambda x: x[0], packed), origins.astype(np.float32),
                            directions.astype(np.float32))
  hit = np.asarray(out["hit"])
  normal = np.asarray(out["normal"])[hit]
  assert hit.sum() > 20
  np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1.0, atol=1e-4)
  assert np.all(np.sum(normal * directions[hit], -1) < 1e-3)


def test_procedural_assets_are_normalised_deterministic_and_captioned():
  for index in range(12):
    asset = procedural.sample_asset(3, index)
    again = procedural.sample_asset(3, index)
    assert asset.caption == again.caption
    for a, b in zip(asset.primitives, again.primitives):
      np.testing.assert_array_equal(a.local_to_world(), b.local_to_world())
    lower, upper = asset.bounds()
    np.testing.assert_allclose(np.max(upper - lower), 2.0, rtol=1e-9)
    np.testing.assert_allclose((lower + upper) / 2, 0.0, atol=1e-9)
    assert asset.caption.startswith(("a ", "an "))
    words = asset.caption.split()
    for primitive in asset.primitives:
      color = [n for n, v in procedural.PALETTE.items() if np.allclose(v, primitive.color_a)][0]
      assert color in words
  assert len({procedural.sample_asset(3, i).caption for i in range(12)}) > 6


def test_procedural_patterns_can_be_restricted():
  everything = [procedural.sample_asset(5, i) for i in range(40)]
  assert {p.pattern for a in everything for p in a.primitives} == set(procedural.PATTERNS)
  # Naming every pattern is the default, draw for draw.
  assert [a.caption for a in everything] == [
      procedural.sample_asset(5, i, patterns=("checkered", "solid", "striped")).caption
      for i in range(40)]
  solid = [procedural.sample_asset(5, i, patterns=("solid",)) for i in range(40)]
  assert {p.pattern for a in solid for p in a.primitives} == {"solid"}
  assert not any("striped" in a.caption or "checkered" in a.caption for a in solid)
  with pytest.raises(ValueError, match="patterns"):
    procedural.sample_asset(5, 0, patterns=("dotted",))


def test_supersampling_gives_fractional_alpha_only_on_edges():
  c2w, intrinsics = orbits.cameras_from_angles([0.0], [0.0], 3.0, 40.0)
  packed = procedural.pack_assets([[_primitive("sphere", scale=(0.8,) * 3)]], 1)
  rgba, _ = raytrace.render_assets(packed, c2w[None], intrinsics[None], 24, 3)
  alpha = np.asarray(rgba[0, 0, ..., 3])
  fractional = (alpha > 0) & (alpha < 1)
  assert fractional.sum() > 10
  # A disc's area in pixels: radius from the projected silhouette angle.
  focal = 24 / (2 * math.tan(math.radians(20)))
  half_angle = math.asin(0.8 / 3.0)
  expected_area = math.pi * (focal * math.tan(half_angle))**2
  assert abs(alpha.sum() - expected_area) / expected_area < 0.02
