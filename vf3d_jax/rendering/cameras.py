"""Cameras: the conventions of the released model, written once.

* Extrinsics are camera-to-world matrices in the OpenGL/Blender convention: the
  camera looks down its ``-Z`` axis, ``+Y`` is up in the image, ``+X`` right.
  World up is ``+Z``. Arrays are ``[..., 4, 4]`` (or ``[..., 3, 4]``) float32.
* Intrinsics are normalised by the image size: ``(fx/w, fy/h, cx/w, cy/h)``,
  arrays ``[..., 4]``. They are resolution independent.
* The model's camera conditioning is 16 numbers: the 3x4 camera-to-world
  matrix row-major, then the four normalised intrinsics.
* Pixel ``(row i, col j)`` of an ``R x R`` image sits at ``((j + 0.5) / R,
  (i + 0.5) / R)`` in normalised image coordinates; rays are row-major.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# OpenCV camera frame (x right, y down, z forward) -> OpenGL (y up, z backward).
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0]).astype(np.float32)
WORLD_UP = (0.0, 0.0, 1.0)

# The released model's source camera: at (1, 0, 0) looking at the origin,
# fx = fy = 384 px for a 512 px image (FOV ~67.4 degrees).
DEFAULT_SOURCE_CAMERA = np.array(
    [0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0.75, 0.75, 0.5, 0.5], np.float32)
DEFAULT_INTRINSICS = DEFAULT_SOURCE_CAMERA[12:]


def look_at(eye, target=(0.0, 0.0, 0.0), up=WORLD_UP, xp=jnp):
  """Camera-to-world matrices of cameras at ``eye`` looking at ``target``.

  Args:
    eye: ``[..., 3]`` camera positions.
    target: ``[..., 3]`` points looked at.
    up: ``[3]`` world up direction.
    xp: array module (``jnp`` or ``np``).

  Returns:
    ``[..., 4, 4]`` OpenGL camera-to-world matrices.
  """
  eye = xp.asarray(eye, xp.float32)
  target = xp.broadcast_to(xp.asarray(target, xp.float32), eye.shape)
  up = xp.broadcast_to(xp.asarray(up, xp.float32), eye.shape)
  normalize = lambda v: v / xp.linalg.norm(v, axis=-1, keepdims=True)
  z = normalize(eye - target)
  x = normalize(xp.cross(up, z))
  y = normalize(xp.cross(z, x))
  rot = xp.stack([x, y, z, eye], axis=-1)  # [..., 3, 4], columns x y z t
  bottom = xp.broadcast_to(xp.asarray([0, 0, 0, 1], xp.float32), eye.shape[:-1] + (1, 4))
  return xp.concatenate([rot, bottom], axis=-2)


def orbit_positions(num_views: int, radius: float = 1.5, elevation: float = 0.0,
                    azimuth_offset=0.0, xp=jnp):
  """Positions on a circle around the z axis.

  Args:
    num_views: number of evenly spaced azimuths over 360 degrees.
    radius: distance from the origin.
    elevation: angle above the xy plane, radians (scalar or ``[num_views]``).
    azimuth_offset: added to every azimuth, radians.
    xp: array module.

  Returns:
    ``[num_views, 3]`` positions; view ``i`` is at azimuth
    ``2 pi i / num_views + azimuth_offset``.
  """
  azimuth = 2 * math.pi * xp.arange(num_views, dtype=xp.float32) / num_views
  azimuth = azimuth + azimuth_offset
  elevation = xp.asarray(elevation, xp.float32)
  return radius * xp.stack([xp.cos(azimuth) * xp.cos(elevation),
                            xp.sin(azimuth) * xp.cos(elevation),
                            xp.broadcast_to(xp.sin(elevation), azimuth.shape)], axis=-1)


def orbit_cameras(num_views: int, radius: float = 1.5, elevation: float = 0.0,
                  azimuth_offset=0.0, xp=jnp):
  """``[num_views, 4, 4]`` cameras on an orbit, looking at the origin."""
  return look_at(orbit_positions(num_views, radius, elevation, azimuth_offset, xp), xp=xp)


def fov_to_focal(fov_degrees: float) -> float:
  """Normalised focal length (``f / size``) of a field of view."""
  return 0.5 / math.tan(math.radians(fov_degrees) / 2)


def normalized_intrinsics(fx, fy, cx, cy, width, height, xp=jnp):
  """``[..., 4]`` intrinsics ``(fx/w, fy/h, cx/w, cy/h)`` from pixel units."""
  return xp.stack([xp.asarray(fx) / width, xp.asarray(fy) / height,
                   xp.asarray(cx) / width, xp.asarray(cy) / height], axis=-1).astype(xp.float32)


def camera_conditioning(c2w, intrinsics, xp=jnp):
  """The model's 16-number camera vector.

  Args:
    c2w: ``[..., 4, 4]`` or ``[..., 3, 4]`` camera-to-world.
    intrinsics: ``[..., 4]`` normalised intrinsics.
    xp: array module.

  Returns:
    ``[..., 16]``.
  """
  c2w = xp.asarray(c2w, xp.float32)
  flat = c2w[..., :3, :4].reshape(c2w.shape[:-2] + (12,))
  intrinsics = xp.broadcast_to(xp.asarray(intrinsics, xp.float32), flat.shape[:-1] + (4,))
  return xp.concatenate([flat, intrinsics], axis=-1)


def split_conditioning(camera, xp=jnp):
  """Inverse of :func:`camera_conditioning`: ``([..., 4, 4], [..., 4])``."""
  camera = xp.asarray(camera, xp.float32)
  rot = camera[..., :12].reshape(camera.shape[:-1] + (3, 4))
  bottom = xp.broadcast_to(xp.asarray([0, 0, 0, 1], xp.float32), camera.shape[:-1] + (1, 4))
  return xp.concatenate([rot, bottom], axis=-2), camera[..., 12:]


def pixel_grid(resolution: int, crop=None):
  """Normalised image coordinates of the pixels of an image or a crop of it.

  Args:
    resolution: side ``R`` of the full square image.
    crop: optional ``(start_x, start_y, size)`` in pixels of the full image.

  Returns:
    ``[S * S, 2]`` float32 ``(x, y)`` in ``[0, 1]``, row-major.
  """
  start_x, start_y, size = (0, 0, resolution) if crop is None else crop
  rows = (jnp.arange(size, dtype=jnp.float32) + start_y + 0.5) / resolution
  cols = (jnp.arange(size, dtype=jnp.float32) + start_x + 0.5) / resolution
  yy, xx = jnp.meshgrid(rows, cols, indexing="ij")
  return jnp.stack([xx, yy], axis=-1).reshape(-1, 2)


def generate_rays(c2w: jax.Array, intrinsics: jax.Array, resolution: int, crop=None):
  """World-space rays through pixel centres.

  Args:
    c2w: ``[4, 4]`` OpenGL camera-to-world.
    intrinsics: ``[4]`` normalised ``(fx, fy, cx, cy)``.
    resolution: side of the full square image.
    crop: optional ``(start_x, start_y, size)``; only that crop's rays.

  Returns:
    ``(origins [S*S, 3], directions [S*S, 3])``, unit directions, row-major.
  """
  uv = pixel_grid(resolution, crop)
  fx, fy, cx, cy = intrinsics[0], intrinsics[1], intrinsics[2], intrinsics[3]
  # Lift to the OpenCV camera frame at depth 1, then to the world the way the
  # released code does (a point on the ray minus the origin, normalised).
  cam = jnp.stack([(uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy,
                   jnp.ones_like(uv[:, 0]), jnp.ones_like(uv[:, 0])], axis=-1)
  c2w_cv = c2w @ jnp.asarray(OPENCV_TO_OPENGL)
  origin = c2w[:3, 3]
  world = jnp.einsum("ij,nj->ni", c2w_cv, cam, precision="highest")[:, :3]
  directions = world - origin
  directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
  return jnp.broadcast_to(origin, directions.shape), directions
