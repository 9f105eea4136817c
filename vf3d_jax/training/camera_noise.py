"""Camera-noise injection: the source camera the model sees is perturbed.

Synthetic multi-view videos come with cameras that are only approximately
right; VFusion3D makes the LRM robust to that by training with noisy input
cameras while supervising with the nominal ones. The perturbation is a small
random rotation of the camera about the object centre (angles ~ N(0,
rotation_deg^2) about a random axis), a translation ~ N(0, translation^2) per
axis, and a relative focal-length change ~ N(0, focal^2) (principal point kept).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vf3d_jax.rendering import cameras


def axis_angle_to_matrix(axis_angle: jax.Array) -> jax.Array:
  """Rodrigues' formula: ``[..., 3]`` rotation vectors -> ``[..., 3, 3]``."""
  angle = jnp.linalg.norm(axis_angle, axis=-1, keepdims=True)
  axis = axis_angle / jnp.maximum(angle, 1e-12)
  x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
  zero = jnp.zeros_like(x)
  k = jnp.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(axis.shape[:-1] + (3, 3))
  s, c = jnp.sin(angle)[..., None], jnp.cos(angle)[..., None]
  eye = jnp.broadcast_to(jnp.eye(3), k.shape)
  return eye + s * k + (1 - c) * (k @ k)


def perturb_cameras(key: jax.Array, camera: jax.Array, rotation_deg: float,
                    translation: float, focal: float) -> jax.Array:
  """Noisy copies of ``[B, 16]`` camera conditionings (zero scales: unchanged)."""
  c2w, intrinsics = cameras.split_conditioning(camera)
  batch = camera.shape[:-1]
  k_rot, k_trans, k_focal = jax.random.split(key, 3)
  rot = axis_angle_to_matrix(
      jax.random.normal(k_rot, batch + (3,)) * jnp.radians(rotation_deg))
  # Rotating about the world origin moves the camera on its orbit and turns it alike.
  new_rot = rot @ c2w[..., :3, :3]
  new_pos = jnp.einsum("...ij,...j->...i", rot, c2w[..., :3, 3])
  new_pos = new_pos + jax.random.normal(k_trans, batch + (3,)) * translation
  scale = 1 + jax.random.normal(k_focal, batch + (1,)) * focal
  intrinsics = jnp.concatenate([intrinsics[..., :2] * scale, intrinsics[..., 2:]], -1)
  new_c2w = jnp.concatenate([new_rot, new_pos[..., None]], -1)
  return cameras.camera_conditioning(new_c2w, intrinsics)
