"""Geometry metrics: exact ground-truth surface samples, Chamfer, F-score, IoU.

Conventions:

* Units are those of the record's world frame, where procedural assets and
  normalised meshes span ``[-1, 1]`` on their longest side (the object is 2
  units across), so a threshold ``tau = 0.05`` is 2.5% of the object's size.
  A reconstructed mesh lives in the model's canonical frame; bring it back with
  :func:`mesh_to_world` before comparing.
* Surface samples are uniform in **world-space area**: every patch of the
  surface receives samples in proportion to its area, whatever the scale of
  the primitive or face it belongs to.
* A procedural asset is the union of its primitives (see
  ``vf3d_jax.data.procedural``), so its surface is the part of each
  primitive's surface outside every other primitive. Where a point also lies
  on another primitive's boundary (within ``1e-6`` local units), the outward
  normals decide: opposite normals mark a contact patch inside the union (a
  cylinder standing on a box), which neither keeps; equal normals mark a
  coincident patch on the union's surface (the flat bottoms of two
  overlapping parts standing on the ground), which the primitive listed
  first keeps, so it is sampled once.
* Distances are Euclidean (L2), not squared. ``chamfer`` is the mean of the
  two directed mean distances, ``(accuracy + completeness) / 2``; the other
  common convention, the sum of mean *squared* distances, is not what is
  computed here.
* Precision, recall and F-score follow Tatarchenko et al. (2019): a point
  counts when its nearest neighbour in the other set is strictly closer than
  ``tau``.
* Silhouettes are alpha mattes ``[..., H, W]``; a pixel is covered when its
  alpha exceeds the threshold.

Everything here is numpy (and scipy's k-d tree); results are float32 points or
Python floats. Samplers take a ``seed`` and are deterministic for it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import spatial

from vf3d_jax.data import procedural

# Points within this distance (local units) of another primitive's boundary
# count as on it.
BOUNDARY_TOLERANCE = 1e-6
# Candidates drawn per round, as a multiple of the points still wanted.
_OVERSAMPLE = 4
_MAX_ROUNDS = 64


def _local_area(kind: str, minor: float) -> float:
  """Surface area of a unit shape in its local frame."""
  if kind == "sphere":
    return 4.0 * math.pi
  if kind == "box":
    return 24.0
  if kind == "cylinder":
    return 6.0 * math.pi  # side 4 pi, caps pi each
  if kind == "cone":
    return math.pi * (1.0 + math.sqrt(5.0))  # lateral pi sqrt(5), base pi
  if kind == "torus":
    return 4.0 * math.pi**2 * minor
  raise ValueError(f"unknown primitive kind {kind!r}")


def _disk(rng: np.random.Generator, count: int) -> np.ndarray:
  """``[count, 2]`` points uniform on the unit disk."""
  radius = np.sqrt(rng.uniform(size=count))
  angle = rng.uniform(0.0, 2.0 * math.pi, size=count)
  return radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], -1)


def _sample_unit_surface(kind: str, minor: float, count: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Points uniform by local area on a unit shape's surface.

  Args:
    kind: one of ``procedural.KINDS[1:]``.
    minor: torus minor radius (ignored by the other kinds).
    count: number of points.
    rng: the generator to draw from.

  Returns:
    ``(points [count, 3], normals [count, 3])`` float64, unit outward normals.
  """
  if kind == "sphere":
    g = rng.normal(size=(count, 3))
    norm = np.linalg.norm(g, axis=-1, keepdims=True)
    points = g / np.maximum(norm, 1e-300)
    return points, points.copy()
  if kind == "box":
    face = rng.integers(0, 6, size=count)
    axis, sign = face // 2, np.where(face % 2 == 0, -1.0, 1.0)
    points = rng.uniform(-1.0, 1.0, size=(count, 3))
    rows = np.arange(count)
    points[rows, axis] = sign
    normals = np.zeros((count, 3))
    normals[rows, axis] = sign
    return points, normals
  if kind == "cylinder":
    # Side 4 pi : bottom pi : top pi.
    part = rng.choice(3, size=count, p=[2.0 / 3.0, 1.0 / 6.0, 1.0 / 6.0])
    angle = rng.uniform(0.0, 2.0 * math.pi, size=count)
    ring = np.stack([np.cos(angle), np.sin(angle)], -1)
    side = np.concatenate([ring, rng.uniform(-1.0, 1.0, size=(count, 1))], -1)
    cap_z = np.where(part == 1, -1.0, 1.0)[:, None]
    cap = np.concatenate([_disk(rng, count), cap_z], -1)
    on_side = (part == 0)[:, None]
    points = np.where(on_side, side, cap)
    normals = np.where(on_side, np.concatenate([ring, np.zeros((count, 1))], -1),
                       np.concatenate([np.zeros((count, 2)), cap_z], -1))
    return points, normals
  if kind == "cone":
    # Lateral pi sqrt(5) : base pi. On the lateral surface the area density is
    # proportional to the distance from the apex, so the radius is sqrt(u).
    root5 = math.sqrt(5.0)
    lateral = rng.uniform(size=count) < root5 / (1.0 + root5)
    radius = np.sqrt(rng.uniform(size=count))
    angle = rng.uniform(0.0, 2.0 * math.pi, size=count)
    ring = np.stack([np.cos(angle), np.sin(angle)], -1)
    z = np.where(lateral, 1.0 - 2.0 * radius, -1.0)
    points = np.concatenate([radius[:, None] * ring, z[:, None]], -1)
    side_normal = np.concatenate([2.0 * ring, np.ones((count, 1))], -1) / root5
    base_normal = np.broadcast_to(np.array([0.0, 0.0, -1.0]), (count, 3))
    normals = np.where(lateral[:, None], side_normal, base_normal)
    return points, normals
  if kind == "torus":
    if not 0.0 < minor < 1.0:
      raise ValueError(f"torus minor radius must be in (0, 1), got {minor}")
    # The area element is minor (1 + minor cos phi) dtheta dphi: draw phi by
    # rejection against its maximum 1 + minor.
    phis = []
    have = 0
    while have < count:
      trial = int(1.2 * (count - have) * (1.0 + minor)) + 16
      phi = rng.uniform(0.0, 2.0 * math.pi, size=trial)
      keep = rng.uniform(size=trial) * (1.0 + minor) < 1.0 + minor * np.cos(phi)
      phis.append(phi[keep])
      have += int(keep.sum())
    phi = np.concatenate(phis)[:count]
    theta = rng.uniform(0.0, 2.0 * math.pi, size=count)
    normals = np.stack([np.cos(phi) * np.cos(theta), np.cos(phi) * np.sin(theta),
                        np.sin(phi)], -1)
    ring = np.stack([np.cos(theta), np.sin(theta), np.zeros(count)], -1)
    return ring + minor * normals, normals
  raise ValueError(f"unknown primitive kind {kind!r}")


def _signed_local(kind: str, minor: float, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Where local points are relative to a unit shape.

  Args:
    kind: one of ``procedural.KINDS[1:]``.
    minor: torus minor radius.
    p: ``[N, 3]`` local points.

  Returns:
    ``(value [N], normal [N, 3])``: ``value`` is negative inside, 0 on the
    surface and positive outside (``max`` of the shape's constraints, each in
    local units), ``normal`` the outward direction (unnormalised) of the
    constraint that attains it.
  """
  x, y, z = p[:, 0], p[:, 1], p[:, 2]
  radial = np.hypot(x, y)
  safe = np.maximum(radial, 1e-300)
  zeros = np.zeros_like(z)
  if kind == "sphere":
    return np.linalg.norm(p, axis=-1) - 1.0, p
  if kind == "box":
    axis = np.argmax(np.abs(p), axis=-1)
    rows = np.arange(len(p))
    normal = np.zeros_like(p)
    normal[rows, axis] = np.sign(p[rows, axis])
    return np.abs(p[rows, axis]) - 1.0, normal
  if kind == "cylinder":
    side, cap = radial - 1.0, np.abs(z) - 1.0
    normal = np.where((side >= cap)[:, None], np.stack([x, y, zeros], -1),
                      np.stack([zeros, zeros, np.sign(z)], -1))
    return np.maximum(side, cap), normal
  if kind == "cone":
    # Inside: radial <= (1 - z) / 2 (which implies z <= 1) and z >= -1.
    side, base = radial - (1.0 - z) / 2.0, -1.0 - z
    normal = np.where((side >= base)[:, None],
                      np.stack([x / safe, y / safe, np.full_like(z, 0.5)], -1),
                      np.stack([zeros, zeros, -np.ones_like(z)], -1))
    return np.maximum(side, base), normal
  if kind == "torus":
    tube = radial - 1.0
    normal = np.stack([tube * x / safe, tube * y / safe, z], -1)
    return np.hypot(tube, z) - minor, normal
  raise ValueError(f"unknown primitive kind {kind!r}")


def _linear(primitive: procedural.Primitive) -> np.ndarray:
  """``[3, 3]`` linear part ``A = rotation @ diag(scale)``, checked invertible."""
  linear = np.asarray(primitive.rotation, np.float64) @ np.diag(
      np.asarray(primitive.scale, np.float64))
  if abs(np.linalg.det(linear)) < 1e-12:
    raise ValueError(f"degenerate {primitive.kind}: singular local-to-world map")
  return linear


def _max_area_jacobian(linear: np.ndarray) -> float:
  """An upper bound of ``|det A| |A^-T n|`` over unit ``n``: ``|det A| / sigma_min``."""
  singular = np.linalg.svd(linear, compute_uv=False)
  return float(np.prod(singular) / singular.min())


def _primitive_candidates(primitives, counts, rng, tol):
  """World points on each primitive, their area Jacobians and visibility.

  A point of primitive ``k`` is covered by primitive ``j`` when it is inside
  ``j`` by more than ``tol``, or on ``j``'s boundary (within ``tol``) where the
  two outward normals point opposite ways (a contact patch, interior to the
  union), or point the same way and ``j < k`` (a coincident patch: the first
  primitive keeps it).

  Returns:
    A list with one ``(points [n, 3], jacobian [n], visible [n])`` per
    primitive: ``jacobian`` is ``dA_world / dA_local`` and ``visible`` says
    that no other primitive covers the point.
  """
  linears = [_linear(p) for p in primitives]
  inverses = [np.linalg.inv(a) for a in linears]
  out = []
  for k, (primitive, count) in enumerate(zip(primitives, counts)):
    local, normals = _sample_unit_surface(primitive.kind, primitive.torus_minor,
                                          int(count), rng)
    linear = linears[k]
    world = local @ linear.T + np.asarray(primitive.center, np.float64)
    # World normals are A^-T n (as rows, n^T A^-1), and
    # dA_world / dA_local = |det A| |A^-T n|.
    world_normals = normals @ inverses[k]
    jacobian = abs(np.linalg.det(linear)) * np.linalg.norm(world_normals, axis=-1)
    visible = np.ones(len(world), bool)
    for j, other in enumerate(primitives):
      if j == k:
        continue
      value, other_normals = _signed_local(
          other.kind, other.torus_minor,
          (world - np.asarray(other.center, np.float64)) @ inverses[j].T)
      same_way = np.sum(world_normals * (other_normals @ inverses[j]), axis=-1) > 0
      on_boundary = np.abs(value) <= tol
      visible &= ~((value < -tol) | (on_boundary & (~same_way | (j < k))))
    out.append((world, jacobian, visible))
  return out


def _area_bounds(primitives) -> np.ndarray:
  """``[P]`` local area times the largest area Jacobian: at least each world area."""
  return np.array([_local_area(p.kind, p.torus_minor) * _max_area_jacobian(_linear(p))
                   for p in primitives])


def sample_procedural_surface(asset: procedural.ProceduralAsset, num_points: int,
                              seed: int) -> np.ndarray:
  """Points exactly on the surface of a procedural asset, uniform by world area.

  Each primitive's unit surface is sampled uniformly by local area and mapped
  to the world by ``p_world = A p_local + center`` (``A = rotation @
  diag(scale)``). A local patch with unit normal ``n`` grows by the area
  Jacobian ``J = |det A| |A^-T n|``, so a candidate is accepted with
  probability proportional to ``J`` times its primitive's local area per
  candidate (rejection sampling, exact), and dropped when another primitive
  covers it (module docstring). Rounds of candidates, about ``4 x`` the
  points still wanted and spread over the primitives in proportion to a
  bound on their world area, repeat until there are enough; ``num_points``
  of the accepted ones are then drawn without replacement, so no point
  repeats.

  Args:
    asset: the asset (its primitives are in the record's world frame).
    num_points: ``N``, the number of points.
    seed: seed of the numpy ``Generator``; the same seed gives the same points.

  Returns:
    ``[N, 3]`` float32 world points, in random order.

  Raises:
    ValueError: ``num_points`` is negative, the asset has no primitives, or a
      primitive is degenerate (singular map, torus minor radius outside
      ``(0, 1)``).
    RuntimeError: hardly any of the primitives' surface is outside the others.
  """
  if num_points < 0:
    raise ValueError(f"num_points must be >= 0, got {num_points}")
  primitives = tuple(asset.primitives)
  if not primitives:
    raise ValueError(f"asset {asset.asset_id!r} has no primitives")
  if num_points == 0:
    return np.zeros((0, 3), np.float32)
  rng = np.random.default_rng(seed)
  bounds = _area_bounds(primitives)
  local_areas = np.array([_local_area(p.kind, p.torus_minor) for p in primitives])
  pool = []
  have = 0
  for _ in range(_MAX_ROUNDS):
    total = _OVERSAMPLE * (num_points - have) + 64
    counts = np.ceil(total * bounds / bounds.sum()).astype(np.int64)
    # Density of candidates of primitive k per unit world area is
    # counts_k / (local_area_k J); accepting with J local_area_k / counts_k / c
    # makes it 1 / c everywhere. c bounds the numerator, so probabilities <= 1.
    ceiling = float(np.max(bounds / counts))
    candidates = _primitive_candidates(primitives, counts, rng, BOUNDARY_TOLERANCE)
    for (world, jacobian, visible), area, count in zip(candidates, local_areas, counts):
      accept = rng.uniform(size=len(world)) * ceiling < jacobian * area / count
      chosen = world[accept & visible]
      pool.append(chosen)
      have += len(chosen)
    if have >= num_points:
      break
  else:
    raise RuntimeError(f"asset {asset.asset_id!r}: {have} of {num_points} surface "
                       f"points after {_MAX_ROUNDS} rounds; is its surface almost "
                       "all inside its primitives?")
  pool = np.concatenate(pool)
  return pool[rng.choice(len(pool), size=num_points, replace=False)].astype(np.float32)


def procedural_surface_area(asset: procedural.ProceduralAsset,
                            num_samples: int = 200_000, seed: int = 0) -> float:
  """Monte Carlo estimate of the world-space area of an asset's surface.

  The area of the union: each primitive contributes its local area times the
  mean of ``J`` (the area Jacobian) times the visibility over uniform local
  samples. For a single primitive of constant ``J`` (a sphere under uniform
  scale) the estimate is exact; otherwise its relative error is about
  ``std(J) / mean(J) / sqrt(samples of that primitive)``, well under 1% with
  the default.

  Args:
    asset: the asset.
    num_samples: local samples over all primitives, spread in proportion to a
      bound on their world area.
    seed: seed of the numpy ``Generator``.

  Returns:
    The area, in squared world units.
  """
  primitives = tuple(asset.primitives)
  if not primitives:
    raise ValueError(f"asset {asset.asset_id!r} has no primitives")
  rng = np.random.default_rng(seed)
  bounds = _area_bounds(primitives)
  counts = np.maximum(np.ceil(num_samples * bounds / bounds.sum()), 1).astype(np.int64)
  candidates = _primitive_candidates(primitives, counts, rng, BOUNDARY_TOLERANCE)
  return float(sum(_local_area(p.kind, p.torus_minor) * np.mean(jacobian * visible)
                   for p, (_, jacobian, visible) in zip(primitives, candidates)))


def sample_triangle_surface(corners: np.ndarray, num_points: int, seed: int) -> np.ndarray:
  """Points uniform by area on a triangle soup.

  A triangle is drawn with probability proportional to its area, then a
  point inside it with barycentrics ``(1 - sqrt(u), sqrt(u) (1 - v),
  sqrt(u) v)`` for uniform ``u, v`` (uniform over the triangle).

  Args:
    corners: ``[F, 3, 3]`` corner positions (``MeshAsset.corners``, or
      ``vertices[faces]``).
    num_points: ``N``.
    seed: seed of the numpy ``Generator``.

  Returns:
    ``[N, 3]`` float32 points (sampled with replacement of triangles); ``[0,
    3]`` when there are no triangles or they all have zero area.
  """
  if num_points < 0:
    raise ValueError(f"num_points must be >= 0, got {num_points}")
  corners = np.asarray(corners, np.float64)
  if corners.ndim != 3 or corners.shape[1:] != (3, 3):
    raise ValueError(f"corners must be [F, 3, 3], got {corners.shape}")
  a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
  areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=-1)
  total = float(areas.sum()) if len(areas) else 0.0
  if not total > 0.0 or num_points == 0:
    return np.zeros((0, 3), np.float32)
  rng = np.random.default_rng(seed)
  face = rng.choice(len(areas), size=num_points, p=areas / total)
  root = np.sqrt(rng.uniform(size=(num_points, 1)))
  v = rng.uniform(size=(num_points, 1))
  points = (1.0 - root) * a[face] + root * (1.0 - v) * b[face] + root * v * c[face]
  return points.astype(np.float32)


def sample_mesh_surface(vertices: np.ndarray, faces: np.ndarray, num_points: int,
                        seed: int) -> np.ndarray:
  """Points uniform by area on an indexed triangle mesh.

  Args:
    vertices: ``[V, 3]`` positions (e.g. ``inference.mesh.Mesh.vertices``).
    faces: ``[F, 3]`` vertex indices.
    num_points: ``N``.
    seed: seed of the numpy ``Generator``.

  Returns:
    ``[N, 3]`` float32 points, or ``[0, 3]`` for a mesh without area (see
    :func:`sample_triangle_surface`).
  """
  vertices = np.asarray(vertices, np.float64).reshape(-1, 3)
  faces = np.asarray(faces, np.int64).reshape(-1, 3)
  return sample_triangle_surface(vertices[faces], num_points, seed)


def _threshold_key(name: str, tau: float) -> str:
  return f"{name}@{tau:g}"


def chamfer_and_fscore(pred_points: np.ndarray, true_points: np.ndarray,
                       thresholds=(0.05, 0.1)) -> dict:
  """Chamfer distance and precision / recall / F-score of two point sets.

  With ``d(x, S)`` the Euclidean distance from ``x`` to its nearest neighbour
  in ``S`` (``scipy.spatial.cKDTree``):

  * ``accuracy = mean_{p in pred} d(p, true)``,
  * ``completeness = mean_{q in true} d(q, pred)``,
  * ``chamfer = (accuracy + completeness) / 2``: L2 distances, not squared
    (the alternative convention sums the mean squared distances);
  * ``precision@tau`` = fraction of ``pred`` with ``d(p, true) < tau``,
    ``recall@tau`` = fraction of ``true`` with ``d(q, pred) < tau``,
    ``fscore@tau = 2 P R / (P + R)``, 0 when both are 0.

  An empty prediction (no mesh was extracted) gives ``nan`` for the three
  distances, 0 for every precision, recall and F-score, and
  ``empty_prediction = True``: averages over a test set then show the failure
  (as ``nan``) instead of silently skipping it.

  Args:
    pred_points: ``[N, 3]`` predicted surface points (``N`` may be 0).
    true_points: ``[M, 3]`` ground-truth surface points, ``M >= 1``.
    thresholds: the ``tau`` values, in world units.

  Returns:
    Dict of Python floats: ``"accuracy"``, ``"completeness"``, ``"chamfer"``,
    and per ``tau`` ``"precision@tau"``, ``"recall@tau"``, ``"fscore@tau"``
    (``tau`` formatted with ``:g``, e.g. ``"fscore@0.05"``); plus the bool
    ``"empty_prediction"``.
  """
  pred = np.asarray(pred_points, np.float64).reshape(-1, 3)
  true = np.asarray(true_points, np.float64).reshape(-1, 3)
  if len(true) == 0:
    raise ValueError("chamfer_and_fscore: no ground-truth points")
  metrics = {}
  if len(pred) == 0:
    metrics.update(accuracy=math.nan, completeness=math.nan, chamfer=math.nan)
    for tau in thresholds:
      for name in ("precision", "recall", "fscore"):
        metrics[_threshold_key(name, tau)] = 0.0
    metrics["empty_prediction"] = True
    return metrics
  pred_to_true, _ = spatial.cKDTree(true).query(pred, k=1)
  true_to_pred, _ = spatial.cKDTree(pred).query(true, k=1)
  accuracy = float(np.mean(pred_to_true))
  completeness = float(np.mean(true_to_pred))
  metrics.update(accuracy=accuracy, completeness=completeness,
                 chamfer=(accuracy + completeness) / 2.0)
  for tau in thresholds:
    precision = float(np.mean(pred_to_true < tau))
    recall = float(np.mean(true_to_pred < tau))
    both = precision + recall
    metrics[_threshold_key("precision", tau)] = precision
    metrics[_threshold_key("recall", tau)] = recall
    metrics[_threshold_key("fscore", tau)] = 2.0 * precision * recall / both if both > 0 else 0.0
  metrics["empty_prediction"] = False
  return metrics


def silhouette_iou(pred_alpha, true_alpha, threshold: float = 0.5) -> np.ndarray:
  """Intersection over union of thresholded alpha masks, per image.

  Args:
    pred_alpha: ``[..., H, W]`` alpha (numpy or JAX).
    true_alpha: same shape.
    threshold: a pixel is covered when its alpha is ``> threshold``.

  Returns:
    ``[...]`` float32 IoU; 1 where both masks are empty.
  """
  pred = np.asarray(pred_alpha)
  true = np.asarray(true_alpha)
  if pred.shape != true.shape or pred.ndim < 2:
    raise ValueError(f"silhouette_iou: expected two [..., H, W] arrays of one shape, "
                     f"got {pred.shape} and {true.shape}")
  pred = pred > threshold
  true = true > threshold
  intersection = np.sum(pred & true, axis=(-2, -1))
  union = np.sum(pred | true, axis=(-2, -1))
  iou = np.where(union > 0, intersection / np.maximum(union, 1), 1.0)
  return iou.astype(np.float32)


def mesh_to_world(vertices: np.ndarray, world_transform: np.ndarray) -> np.ndarray:
  """Takes points from the model's canonical frame back to the record's world.

  ``views.canonicalize_cameras`` returns the similarity ``world_transform``
  with ``p_model = world_transform @ p_world`` on homogeneous points (a
  rotation, a translation and a uniform scale ``s``); a mesh extracted from
  the model's field is in the model's frame, so this applies its inverse.
  Distances in the world frame are those of the model's frame divided by
  ``s``.

  Args:
    vertices: ``[V, 3]`` points in the model's frame.
    world_transform: ``[4, 4]`` the similarity (last row ``[0, 0, 0, 1]``).

  Returns:
    ``[V, 3]`` float32 points in the record's world frame.
  """
  transform = np.asarray(world_transform, np.float64)
  if transform.shape != (4, 4) or not np.allclose(transform[3], [0, 0, 0, 1]):
    raise ValueError(f"world_transform must be a [4, 4] affine map, got {transform}")
  inverse = np.linalg.inv(transform)
  points = np.asarray(vertices, np.float64).reshape(-1, 3)
  return (points @ inverse[:3, :3].T + inverse[:3, 3]).astype(np.float32)
