"""Cameras of the renders and the loader's per-sample view logic."""

import math

import numpy as np
import pytest

from vf3d_jax.data import orbits
from vf3d_jax.data import views
from vf3d_jax.rendering import cameras


def _project(point, c2w, intrinsics):
  """Normalised image coordinates of a world point (OpenCV pixel convention)."""
  cam = np.linalg.inv(np.asarray(c2w, float)) @ np.append(point, 1.0)
  x, y, z = cam[0], -cam[1], -cam[2]
  return np.array([intrinsics[0] * x / z + intrinsics[2], intrinsics[1] * y / z + intrinsics[3]])


def test_orbit_cameras_round_trip_and_match_the_model_conventions():
  spec = orbits.ViewSpec(num_orbit_views=16, num_random_views=5)
  sampled = orbits.sample_views(spec, np.random.default_rng(0))
  c2w = sampled["c2w"]
  assert c2w.shape == (21, 4, 4)
  # Angles -> cameras -> angles.
  azimuth, elevation = orbits.angles_from_cameras(c2w)
  np.testing.assert_allclose(azimuth, sampled["azimuth"], atol=1e-5)
  np.testing.assert_allclose(elevation, sampled["elevation"], atol=1e-5)
  # Orbit: 16 even azimuths starting at +x, one elevation in [0, pi/4].
  np.testing.assert_allclose(np.diff(sampled["azimuth"][:16]), 2 * math.pi / 16, atol=1e-5)
  assert sampled["azimuth"][0] == 0
  assert 0 <= sampled["orbit_elevation"] <= math.pi / 4
  np.testing.assert_allclose(sampled["elevation"][:16], sampled["orbit_elevation"])
  # Every camera sits at the fitted distance, looks at the origin, +z up.
  np.testing.assert_allclose(np.linalg.norm(c2w[:, :3, 3], axis=-1), orbits.fit_distance(
      orbits.DEFAULT_FOV_DEGREES), rtol=1e-5)
  forward = -c2w[:, :3, 2]
  np.testing.assert_allclose(forward, -c2w[:, :3, 3] / np.linalg.norm(
      c2w[:, :3, 3], axis=-1, keepdims=True), atol=1e-5)
  assert np.all(c2w[:, 2, 1] > 0)  # image up has a +z component
  # Conditioning vector round trip.
  vector = cameras.camera_conditioning(c2w, sampled["intrinsics"], xp=np)
  back_c2w, back_intrinsics = cameras.split_conditioning(vector, xp=np)
  np.testing.assert_array_equal(back_c2w, c2w)
  np.testing.assert_array_equal(back_intrinsics, sampled["intrinsics"])
  # The model's field of view: fx = 0.75.
  np.testing.assert_allclose(sampled["intrinsics"][:, 0], 0.75, rtol=1e-6)
  # View 0 at elevation 0 is the default source camera, moved out to 3.12.
  flat = orbits.cameras_from_angles([0.0], [0.0], 1.0, orbits.DEFAULT_FOV_DEGREES)[0][0]
  np.testing.assert_allclose(flat, views.canonical_c2w(), atol=1e-6)


def test_the_fitted_distance_keeps_the_box_in_view():
  spec = orbits.ViewSpec(num_orbit_views=8, num_random_views=32)
  sampled = orbits.sample_views(spec, np.random.default_rng(1))
  corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
  for c2w, intrinsics in zip(sampled["c2w"], sampled["intrinsics"]):
    for corner in corners:
      pixel = _project(corner, c2w, intrinsics)
      assert np.all((pixel >= 0) & (pixel <= 1))


def _random_cameras(rng, count):
  eye = rng.normal(size=(count, 3))
  eye *= rng.uniform(1.5, 4.0, size=(count, 1)) / np.linalg.norm(eye, axis=-1, keepdims=True)
  return cameras.look_at(eye.astype(np.float32), xp=np).astype(np.float64)


@pytest.mark.parametrize("canonical_distance", [1.0, None])
def test_canonicalize_makes_the_source_canonical_and_keeps_the_scene(canonical_distance):
  rng = np.random.default_rng(2)
  c2w = _random_cameras(rng, 6)
  intrinsics = np.array([0.75, 0.75, 0.5, 0.5])
  source = 3
  new, world, scale = views.canonicalize_cameras(c2w, source, canonical_distance)
  new = new.astype(np.float64)
  distance = np.linalg.norm(c2w[source, :3, 3])
  target = views.canonical_c2w()
  target[:3, 3] *= (canonical_distance or distance)
  np.testing.assert_allclose(new[source], target, atol=1e-5)
  np.testing.assert_allclose(scale, (canonical_distance or distance) / distance)
  # Rotations stay rotations; relative rotations are unchanged; relative
  # translations scale by `scale`.
  for i in range(6):
    np.testing.assert_allclose(new[i, :3, :3] @ new[i, :3, :3].T, np.eye(3), atol=1e-5)
    for j in range(6):
      before = np.linalg.inv(c2w[i]) @ c2w[j]
      after = np.linalg.inv(new[i]) @ new[j]
      np.testing.assert_allclose(after[:3, :3], before[:3, :3], atol=1e-5)
      np.testing.assert_allclose(after[:3, 3], scale * before[:3, 3], atol=1e-5)
  # A world point moved by `world` lands on the same pixel in every view,
  # and the origin the cameras look at stays put.
  for point in rng.normal(size=(4, 3)) * 0.5:
    moved = (world @ np.append(point, 1.0))[:3]
    for i in range(6):
      np.testing.assert_allclose(_project(moved, new[i], intrinsics),
                                 _project(point, c2w[i], intrinsics), atol=1e-5)
  np.testing.assert_allclose(world @ np.array([0, 0, 0, 1.0]), [0, 0, 0, 1], atol=1e-6)


def test_select_views():
  rng = np.random.default_rng(3)
  for _ in range(50):
    source, render = views.select_views(rng, 20, 4, include_source=True,
                                        num_source_candidates=16)
    assert source < 16 and render[0] == source and len(set(render.tolist())) == 4
    source, render = views.select_views(rng, 5, 4, include_source=False)
    assert source not in render and len(set(render.tolist())) == 4
  with pytest.raises(ValueError):
    views.select_views(rng, 4, 4, include_source=False)


def test_composite_resize_and_crop():
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[:4, :, :3] = [255, 0, 0]
  rgba[:4, :, 3] = 255
  rgba[4:, :, 3] = 51  # 20% opaque black
  rgb, alpha = views.composite(rgba, [0.0, 0.0, 1.0])
  np.testing.assert_allclose(rgb[0, 0], [1, 0, 0])
  np.testing.assert_allclose(rgb[7, 7], [0, 0, 0.8], atol=1e-6)
  small = views.resize(rgb, 2)
  np.testing.assert_allclose(small[0, 0], [1, 0, 0])
  np.testing.assert_allclose(small[1, 1], [0, 0, 0.8], atol=1e-6)
  np.testing.assert_allclose(views.resize(alpha, 3).mean(), alpha.mean(), atol=0.02)
  for _ in range(20):
    x, y, size = views.crop_box(np.random.default_rng(_), 10, 4)
    assert 0 <= x <= 6 and 0 <= y <= 6 and size == 4
