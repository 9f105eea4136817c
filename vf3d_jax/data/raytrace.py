"""Exact ray casting of procedural primitives in JAX.

Each primitive is an affine image of a unit shape (see ``procedural``). A world
ray ``o + t d`` (unit ``d``) maps to the local ray ``A o + b + t (A d)``, so the
local hit parameter *is* the world distance ``t``: spheres, cylinders and cones
are solved by quadratics, boxes by slabs, tori by bracketing the quartic's first
sign change and bisecting it to float precision. To keep the quadratics well
conditioned, each local ray first jumps to its entry into a sphere slightly
larger than the unit shape; a chunk of rays that misses that sphere skips the
primitive.

Primitives are visited by ``lax.scan`` with ``lax.switch`` on their kind, so a
ray pays only for the kinds an asset has; assets and ray chunks go through
``lax.map``. Pixels follow ``cameras.generate_rays`` (pixel centres, OpenGL
camera-to-world, normalised intrinsics), supersampled ``f x f`` per pixel for
anti-aliased alpha.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from vf3d_jax.data import shading
from vf3d_jax.rendering import cameras

BOUND_RADIUS = math.sqrt(3.0)
_TORUS_BRACKETS = 40
_TORUS_BISECTIONS = 24


def _safe_reciprocal(x):
  return 1.0 / jnp.where(jnp.abs(x) < 1e-12, jnp.where(x < 0, -1e-12, 1e-12), x)


def _stable_quadratic(a, half_b, c):
  """Both roots of ``a u^2 + 2 half_b u + c`` (``inf`` where none), sorted.

  Uses ``q = -(half_b + sign(half_b) sqrt(disc))``, roots ``q / a`` and
  ``c / q``, which stays accurate when ``a`` or ``c`` is tiny.
  """
  disc = half_b * half_b - a * c
  root = jnp.sqrt(jnp.maximum(disc, 0.0))
  q = -(half_b + jnp.where(half_b >= 0, root, -root))
  r1 = jnp.where(jnp.abs(a) > 1e-12, q / jnp.where(a == 0, 1.0, a), jnp.inf)
  r2 = jnp.where(jnp.abs(q) > 1e-20, c / jnp.where(q == 0, 1.0, q), jnp.inf)
  valid = disc >= 0
  lo = jnp.where(valid, jnp.minimum(r1, r2), jnp.inf)
  hi = jnp.where(valid, jnp.maximum(r1, r2), jnp.inf)
  return lo, hi


def _first_valid(candidates):
  """Smallest non-negative ``u`` among ``(u [N], normal [N, 3], valid [N])``."""
  best_u = jnp.full(candidates[0][0].shape, jnp.inf)
  best_n = jnp.zeros(candidates[0][1].shape)
  for u, normal, valid in candidates:
    take = valid & (u >= 0) & (u < best_u)
    best_u = jnp.where(take, u, best_u)
    best_n = jnp.where(take[:, None], normal, best_n)
  return best_u, best_n


# Each intersector takes the local ray start q [N, 3], unit direction dn [N, 3]
# and the torus minor radius; returns (u [N] distance along dn, inf on a miss,
# unnormalised local normal [N, 3]).

def _miss(q, dn, minor):
  del dn, minor
  return jnp.full(q.shape[:1], jnp.inf), jnp.zeros_like(q)


def _sphere(q, dn, minor):
  del minor
  lo, _ = _stable_quadratic(jnp.ones_like(q[:, 0]), jnp.sum(q * dn, -1),
                            jnp.sum(q * q, -1) - 1.0)
  return _first_valid([(lo, q + lo[:, None] * dn, jnp.isfinite(lo))])


def _box(q, dn, minor):
  del minor
  inv = _safe_reciprocal(dn)
  t0, t1 = (-1.0 - q) * inv, (1.0 - q) * inv
  near, far = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
  entry = jnp.max(near, axis=-1)
  exit_ = jnp.min(far, axis=-1)
  axis = jnp.argmax(near, axis=-1)
  normal = -jnp.sign(dn) * jax.nn.one_hot(axis, 3, dtype=q.dtype)
  return _first_valid([(entry, normal, (entry <= exit_) & (exit_ >= 0))])


def _caps(q, dn, heights, radius_at):
  """Intersections with the planes ``z = h`` inside the disc of ``radius_at(h)``."""
  candidates = []
  inv = _safe_reciprocal(dn[:, 2])
  for h in heights:
    u = (h - q[:, 2]) * inv
    p = q + u[:, None] * dn
    inside = p[:, 0] ** 2 + p[:, 1] ** 2 <= radius_at(h) ** 2
    normal = jnp.broadcast_to(jnp.array([0.0, 0.0, math.copysign(1.0, h)]), q.shape)
    candidates.append((u, normal, inside & jnp.isfinite(u)))
  return candidates


def _cylinder(q, dn, minor):
  del minor
  a = dn[:, 0] ** 2 + dn[:, 1] ** 2
  half_b = q[:, 0] * dn[:, 0] + q[:, 1] * dn[:, 1]
  c = q[:, 0] ** 2 + q[:, 1] ** 2 - 1.0
  candidates = []
  for u in _stable_quadratic(a, half_b, c):
    p = q + u[:, None] * dn
    normal = p * jnp.array([1.0, 1.0, 0.0])
    candidates.append((u, normal, jnp.isfinite(u) & (jnp.abs(p[:, 2]) <= 1.0)))
  candidates += _caps(q, dn, (-1.0, 1.0), lambda h: 1.0)
  return _first_valid(candidates)


def _cone(q, dn, minor):
  del minor
  # x^2 + y^2 = ((1 - z) / 2)^2 on -1 <= z <= 1.
  w = 1.0 - q[:, 2]
  a = dn[:, 0] ** 2 + dn[:, 1] ** 2 - 0.25 * dn[:, 2] ** 2
  half_b = q[:, 0] * dn[:, 0] + q[:, 1] * dn[:, 1] + 0.25 * w * dn[:, 2]
  c = q[:, 0] ** 2 + q[:, 1] ** 2 - 0.25 * w * w
  candidates = []
  for u in _stable_quadratic(a, half_b, c):
    p = q + u[:, None] * dn
    normal = jnp.stack([p[:, 0], p[:, 1], 0.25 * (1.0 - p[:, 2])], axis=-1)
    candidates.append((u, normal, jnp.isfinite(u) & (jnp.abs(p[:, 2]) <= 1.0)))
  candidates += _caps(q, dn, (-1.0,), lambda h: 1.0)
  return _first_valid(candidates)


def _torus_implicit(p, minor):
  """``(|p|^2 + 1 - r^2)^2 - 4 (x^2 + y^2)``: negative inside the torus."""
  g = jnp.sum(p * p, -1) + 1.0 - minor * minor
  return g * g - 4.0 * (p[..., 0] ** 2 + p[..., 1] ** 2)


def _torus(q, dn, minor):
  # The quartic is negative inside; find the first sample inside the tube,
  # then bisect the bracket. ``q`` is on the torus' bounding sphere; the search
  # spans the part of the ray inside it and inside the slab ``|z| <= minor``.
  _, leave = _stable_quadratic(jnp.ones_like(q[:, 0]), jnp.sum(q * dn, -1),
                               jnp.sum(q * q, -1) - (1.0 + minor) ** 2)
  inv_z = _safe_reciprocal(dn[:, 2])
  z0, z1 = (-minor - q[:, 2]) * inv_z, (minor - q[:, 2]) * inv_z
  start = jnp.maximum(jnp.minimum(z0, z1), 0.0)
  end = jnp.minimum(jnp.where(jnp.isfinite(leave), leave, 0.0), jnp.maximum(z0, z1))
  span = jnp.maximum(end - start, 0.0)
  step = span / (_TORUS_BRACKETS - 1)

  def search(k, carry):
    found, lo, hi = carry
    u = start + k * step
    inside = _torus_implicit(q + u[:, None] * dn, minor) < 0
    new = inside & ~found
    return found | inside, jnp.where(new, u - step, lo), jnp.where(new, u, hi)

  zeros = jnp.zeros_like(start)
  found, lo, hi = jax.lax.fori_loop(0, _TORUS_BRACKETS, search,
                                    (zeros > 1, zeros, zeros))
  lo = jnp.maximum(lo, start)

  def bisect(_, carry):
    lo, hi = carry
    mid = 0.5 * (lo + hi)
    inside = _torus_implicit(q + mid[:, None] * dn, minor) < 0
    return jnp.where(inside, lo, mid), jnp.where(inside, mid, hi)

  lo, hi = jax.lax.fori_loop(0, _TORUS_BISECTIONS, bisect, (lo, hi))
  u = jnp.where(found, hi, jnp.inf)
  p = q + u[:, None] * dn
  g = jnp.sum(p * p, -1, keepdims=True) + 1.0 - minor * minor
  normal = g * p - 2.0 * p * jnp.array([1.0, 1.0, 0.0])
  return u, jnp.where(found[:, None], normal, 0.0)


_INTERSECTORS = (_miss, _sphere, _box, _cylinder, _cone, _torus)
# Radius of the sphere around each unit shape (a torus adds its minor radius).
_BOUND_RADII = (0.0, 1.0, BOUND_RADIUS, math.sqrt(2.0), math.sqrt(2.0), 1.0)
_TORUS_CODE = 5


def _albedo(p_local, color_a, color_b, pattern, frequency):
  """``[N, 3]`` pattern colour at local points (codes as ``PATTERNS``)."""
  cells = jnp.floor(frequency[:, None] * (p_local + 1.0) + 0.25)
  stripes = jnp.mod(cells[:, 2], 2.0) > 0.5
  checks = jnp.mod(jnp.sum(cells, -1), 2.0) > 0.5
  second = jnp.where(pattern == 1, stripes, jnp.where(pattern == 2, checks, False))
  return jnp.where(second[:, None], color_b, color_a)


def trace_rays(scene: dict, origins: jax.Array, directions: jax.Array) -> dict:
  """Casts rays against one asset's primitives.

  Args:
    scene: one asset of ``procedural.pack_assets`` (leading dim ``P``).
    origins: ``[N, 3]`` world ray origins.
    directions: ``[N, 3]`` unit world directions.

  Returns:
    Dict of ``rgb [N, 3]`` (shaded, 0 on a miss), ``hit [N]`` bool,
    ``depth [N]`` distance along the ray (``inf`` on a miss),
    ``normal [N, 3]`` unit world normal (0 on a miss).
  """
  num_rays = origins.shape[0]

  def visit(carry, primitive):
    best_t, best_index, best_normal, best_local = carry
    matrix = primitive["world_to_local"]
    local_o = origins @ matrix[:, :3].T + matrix[:, 3]
    local_d = directions @ matrix[:, :3].T
    length = jnp.linalg.norm(local_d, axis=-1)
    dn = local_d / length[:, None]
    # Start at the kind's bounding sphere (or at the origin when inside it),
    # and skip the primitive for the whole chunk when no ray meets that sphere.
    # The margin keeps the start strictly outside the shape, so entry roots
    # are clearly positive.
    radius = 1.05 * (jnp.array(_BOUND_RADII)[primitive["kind"]] + jnp.where(
        primitive["kind"] == _TORUS_CODE, primitive["torus_minor"], 0.0))
    enter, leave = _stable_quadratic(jnp.ones_like(length), jnp.sum(local_o * dn, -1),
                                     jnp.sum(local_o * local_o, -1) - radius**2)
    meets = jnp.isfinite(leave) & (leave >= 0)
    start = jnp.maximum(jnp.where(jnp.isfinite(enter), enter, 0.0), 0.0)
    q = local_o + start[:, None] * dn
    kind = jnp.where(jnp.any(meets), primitive["kind"], 0)
    u, normal = jax.lax.switch(kind, _INTERSECTORS, q, dn, primitive["torus_minor"])
    u = jnp.where(meets, u, jnp.inf)
    t = (start + u) / length
    closer = t < best_t
    world_normal = normal @ primitive["normal_to_world"].T
    return (jnp.where(closer, t, best_t),
            jnp.where(closer, primitive["index"], best_index),
            jnp.where(closer[:, None], world_normal, best_normal),
            jnp.where(closer[:, None], q + u[:, None] * dn, best_local)), None

  primitives = dict(scene, index=jnp.arange(scene["kind"].shape[0], dtype=jnp.int32))
  init = (jnp.full((num_rays,), jnp.inf), jnp.zeros((num_rays,), jnp.int32),
          jnp.zeros((num_rays, 3)), jnp.zeros((num_rays, 3)))
  (t, index, normal, local), _ = jax.lax.scan(visit, init, primitives)
  hit = jnp.isfinite(t)
  normal = normal / jnp.maximum(jnp.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
  albedo = _albedo(local, scene["color_a"][index], scene["color_b"][index],
                   scene["pattern"][index], scene["pattern_frequency"][index])
  rgb = shading.lambertian(albedo, normal, directions)
  return {"rgb": jnp.where(hit[:, None], rgb, 0.0), "hit": hit,
          "depth": t, "normal": jnp.where(hit[:, None], normal, 0.0)}


def _view_rays(c2w, intrinsics, resolution):
  origins, directions = jax.vmap(
      lambda c, k: cameras.generate_rays(c, k, resolution))(c2w, intrinsics)
  return origins.reshape(-1, 3), directions.reshape(-1, 3)


def render_asset_views(scene: dict, c2w: jax.Array, intrinsics: jax.Array,
                       resolution: int, supersample: int = 1,
                       rays_per_chunk: int = 16384) -> tuple[jax.Array, jax.Array]:
  """Renders one asset from several cameras.

  Args:
    scene: one asset of ``procedural.pack_assets``.
    c2w: ``[V, 4, 4]`` OpenGL camera-to-world.
    intrinsics: ``[V, 4]`` normalised intrinsics.
    resolution: output side ``R``.
    supersample: ``f``; ``f x f`` rays a pixel, box-filtered.
    rays_per_chunk: rays traced at once (bounds memory).

  Returns:
    ``(rgba [V, R, R, 4] float32 straight alpha, depth [V, R, R])``; depth is
    the mean ray distance of the covered samples, ``inf`` where empty.
  """
  views = c2w.shape[0]
  fine = resolution * supersample
  origins, directions = _view_rays(c2w, intrinsics, fine)
  total = origins.shape[0]
  chunk = min(rays_per_chunk, total)
  padded = -(-total // chunk) * chunk
  pad = ((0, padded - total), (0, 0))
  origins = jnp.pad(origins, pad).reshape(-1, chunk, 3)
  directions = jnp.pad(directions, pad, constant_values=1.0)
  directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
  directions = directions.reshape(-1, chunk, 3)
  out = jax.lax.map(lambda od: trace_rays(scene, od[0], od[1]), (origins, directions))
  unpad = lambda x: x.reshape((padded,) + x.shape[2:])[:total].reshape(
      (views, fine, fine) + x.shape[2:])
  return shading.downsample_supersampled(unpad(out["rgb"]), unpad(out["hit"]),
                                         unpad(out["depth"]), supersample)


@functools.partial(jax.jit, static_argnames=("resolution", "supersample", "rays_per_chunk"))
def render_assets(scenes: dict, c2w: jax.Array, intrinsics: jax.Array, resolution: int,
                  supersample: int = 1, rays_per_chunk: int = 16384):
  """Batched :func:`render_asset_views`: ``scenes`` with leading ``[B, P]``,
  ``c2w [B, V, 4, 4]``, ``intrinsics [B, V, 4]`` ->
  ``(rgba [B, V, R, R, 4], depth [B, V, R, R])``.

  Assets go one after another (``lax.map``) so that the kind switch stays a
  real branch; within an asset the rays of all views are traced in chunks.
  """
  return jax.lax.map(
      lambda args: render_asset_views(args[0], args[1], args[2], resolution,
                                      supersample, rays_per_chunk),
      (scenes, c2w, intrinsics))
