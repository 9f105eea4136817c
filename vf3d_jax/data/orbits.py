"""Cameras of a multi-view render: an orbit plus random views.

VFusion3D fine-tunes its video model on 16 views with azimuths evenly spaced
over 360 degrees at one elevation per asset, drawn from ``[0, pi/4]``. Here view
``i < num_orbit_views`` sits at azimuth ``2 pi i / num_orbit_views`` (plus an
optional per-asset offset) and the asset's orbit elevation; the remaining
views have random azimuths and elevations. All cameras look at the origin with
world up ``+z`` and share one field of view (``cameras`` conventions).

Default distance: the smallest at which the whole ``[-1, 1]^3`` box stays in
view from any direction, ``sqrt(3) / sin(fov / 2)``; with the released model's
field of view (``fx = 0.75``, 67.38 degrees) that is 3.12, and an asset whose
longest side spans ``[-1, 1]`` covers about half of the frame. Smaller
distances make objects larger but may clip the corners of the box.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from vf3d_jax.rendering import cameras

# Field of view of the released model's source camera (fx = 0.75).
DEFAULT_FOV_DEGREES = math.degrees(2 * math.atan(0.5 / float(cameras.DEFAULT_INTRINSICS[0])))


def fit_distance(fov_degrees: float) -> float:
  """Camera distance at which the sphere around ``[-1, 1]^3`` fills the view."""
  return math.sqrt(3.0) / math.sin(math.radians(fov_degrees) / 2)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """How to place the cameras of one asset."""
  # Evenly spaced orbit views.
  num_orbit_views: int = 16
  # Additional views at random azimuth and elevation.
  num_random_views: int = 0
  # Camera distance from the origin; None -> fit_distance(fov_degrees).
  radius: float | None = None
  # Full field of view (both axes, square images), degrees.
  fov_degrees: float = DEFAULT_FOV_DEGREES
  # Range of the per-asset orbit elevation, radians.
  orbit_elevation_range: tuple[float, float] = (0.0, math.pi / 4)
  # Range of random-view elevations, radians.
  random_elevation_range: tuple[float, float] = (-math.pi / 12, math.pi / 3)
  # Rotate the orbit by a random azimuth per asset (else view 0 is at +x).
  random_azimuth_offset: bool = False

  @property
  def num_views(self) -> int:
    return self.num_orbit_views + self.num_random_views

  @property
  def distance(self) -> float:
    return fit_distance(self.fov_degrees) if self.radius is None else float(self.radius)


def cameras_from_angles(azimuth, elevation, distance: float, fov_degrees: float):
  """Cameras looking at the origin from spherical angles.

  Args:
    azimuth: ``[V]`` radians, from ``+x`` towards ``+y``.
    elevation: ``[V]`` radians above the xy plane.
    distance: distance from the origin.
    fov_degrees: field of view.

  Returns:
    ``(c2w [V, 4, 4], intrinsics [V, 4])`` float32 numpy arrays.
  """
  azimuth = np.asarray(azimuth, np.float64)
  elevation = np.asarray(elevation, np.float64)
  eye = distance * np.stack([np.cos(azimuth) * np.cos(elevation),
                             np.sin(azimuth) * np.cos(elevation), np.sin(elevation)], -1)
  c2w = cameras.look_at(eye.astype(np.float32), xp=np).astype(np.float32)
  focal = cameras.fov_to_focal(fov_degrees)
  intrinsics = np.tile(np.array([focal, focal, 0.5, 0.5], np.float32), (len(azimuth), 1))
  return c2w, intrinsics


def angles_from_cameras(c2w) -> tuple[np.ndarray, np.ndarray]:
  """``(azimuth [V], elevation [V])`` of camera positions, radians."""
  position = np.asarray(c2w, np.float64)[..., :3, 3]
  azimuth = np.mod(np.arctan2(position[..., 1], position[..., 0]), 2 * math.pi)
  elevation = np.arcsin(np.clip(position[..., 2] / np.linalg.norm(position, axis=-1), -1, 1))
  return azimuth, elevation


def sample_views(spec: ViewSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Cameras for one asset.

  Returns:
    Dict of ``c2w [V, 4, 4]``, ``intrinsics [V, 4]``, ``azimuth [V]``,
    ``elevation [V]`` (float32) and ``orbit_elevation`` (scalar), with
    ``V = num_orbit_views + num_random_views``, orbit views first.
  """
  orbit_elevation = rng.uniform(*spec.orbit_elevation_range)
  offset = rng.uniform(0, 2 * math.pi) if spec.random_azimuth_offset else 0.0
  orbit = np.mod(2 * math.pi * np.arange(spec.num_orbit_views) / max(spec.num_orbit_views, 1)
                 + offset, 2 * math.pi)
  azimuth = np.concatenate([orbit, rng.uniform(0, 2 * math.pi, spec.num_random_views)])
  elevation = np.concatenate([np.full(spec.num_orbit_views, orbit_elevation),
                              rng.uniform(*spec.random_elevation_range, spec.num_random_views)])
  c2w, intrinsics = cameras_from_angles(azimuth, elevation, spec.distance, spec.fov_degrees)
  return {"c2w": c2w, "intrinsics": intrinsics, "azimuth": azimuth.astype(np.float32),
          "elevation": elevation.astype(np.float32),
          "orbit_elevation": np.float32(orbit_elevation)}
