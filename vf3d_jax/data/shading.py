"""Shading shared by the primitive and mesh renderers.

Lights are fixed in the world, not to the camera: every view of an asset then
shows the same colour at the same surface point, which is what a reconstruction
model without view-dependent colour can learn. A key light from above, a weak
fill from the opposite side and an ambient term keep every side readable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

AMBIENT = 0.35
KEY_LIGHT = np.array([0.4, 0.3, 1.0], np.float32) / np.linalg.norm([0.4, 0.3, 1.0])
KEY_STRENGTH = 0.5
FILL_LIGHT = np.array([-0.5, -0.6, -0.2], np.float32) / np.linalg.norm([-0.5, -0.6, -0.2])
FILL_STRENGTH = 0.2


def lambertian(albedo: jax.Array, normal: jax.Array, view_direction: jax.Array) -> jax.Array:
  """Lambertian + ambient shading under the fixed world lights.

  Args:
    albedo: ``[..., 3]`` surface colour in ``[0, 1]``.
    normal: ``[..., 3]`` unit world normals (either orientation).
    view_direction: ``[..., 3]`` ray directions; normals are turned to face
      the viewer, so open or inconsistently wound meshes shade the same.

  Returns:
    ``[..., 3]`` shaded colour in ``[0, 1]``.
  """
  facing = jnp.sum(normal * view_direction, axis=-1, keepdims=True) > 0
  normal = jnp.where(facing, -normal, normal)
  key = jnp.maximum(jnp.sum(normal * KEY_LIGHT, axis=-1, keepdims=True), 0.0)
  fill = jnp.maximum(jnp.sum(normal * FILL_LIGHT, axis=-1, keepdims=True), 0.0)
  return jnp.clip(albedo * (AMBIENT + KEY_STRENGTH * key + FILL_STRENGTH * fill), 0.0, 1.0)


def downsample_supersampled(rgb: jax.Array, hit: jax.Array, depth: jax.Array,
                            factor: int) -> tuple[jax.Array, jax.Array]:
  """Box-filters a supersampled render to straight-alpha RGBA and mean depth.

  Args:
    rgb: ``[V, R*f, R*f, 3]`` colours (anything where ``hit`` is 0).
    hit: ``[V, R*f, R*f]`` 1 where a sample hit the surface.
    depth: ``[V, R*f, R*f]`` ray distance (``inf`` where missed).
    factor: supersampling factor ``f``.

  Returns:
    ``(rgba [V, R, R, 4], depth [V, R, R])``: alpha is the covered fraction,
    rgb the mean colour of the covered samples (0 where none), depth the mean
    distance of the covered samples (``inf`` where none).
  """
  views, size = rgb.shape[0], rgb.shape[1] // factor
  def blocks(x):
    return x.reshape((views, size, factor, size, factor) + x.shape[3:])
  hit = hit.astype(jnp.float32)
  count = blocks(hit).sum(axis=(2, 4))
  safe = jnp.maximum(count, 1.0)
  color = blocks(rgb * hit[..., None]).sum(axis=(2, 4)) / safe[..., None]
  mean_depth = blocks(jnp.where(hit > 0, depth, 0.0)).sum(axis=(2, 4)) / safe
  mean_depth = jnp.where(count > 0, mean_depth, jnp.inf)
  alpha = count / (factor * factor)
  return jnp.concatenate([color, alpha[..., None]], axis=-1), mean_depth
