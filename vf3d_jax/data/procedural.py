"""Procedural 3D assets: seeded compositions of analytic primitives with captions.

An asset is a few primitives (sphere, ellipsoid, box, cylinder, cone, torus)
stacked on each other or standing side by side, each with a named colour and a
solid, striped or checkered pattern, plus a caption that says what it is
("a red cone on a blue box, next to a green torus"). Every primitive is an
affine image of a unit shape, so renders have exact silhouettes and depth.

Unit shapes, in their local frame:

* ``sphere``: ``|p| <= 1`` (an ``ellipsoid`` is a sphere with unequal scales).
* ``box``: ``[-1, 1]^3``.
* ``cylinder``: ``x^2 + y^2 <= 1``, ``|z| <= 1``.
* ``cone``: apex at ``z = 1``, base of radius 1 at ``z = -1``.
* ``torus``: major radius 1 around the z axis, minor radius ``torus_minor``.

A primitive maps local points to world points by
``p_world = rotation @ (scale * p_local) + center``. Assets are normalised so
their bounding box is centred at the origin with its longest side spanning
``[-1, 1]``; world up is ``+z``. ``sample_asset(seed, index)`` is a pure
function of its arguments, so a dataset can be regenerated or resumed exactly.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Kind codes used by the renderer; 0 marks an unused slot.
KINDS = ("none", "sphere", "box", "cylinder", "cone", "torus")
KIND_CODES = {name: code for code, name in enumerate(KINDS)}
PATTERNS = ("solid", "striped", "checkered")
PATTERN_CODES = {name: code for code, name in enumerate(PATTERNS)}

# Named colours, so captions are true to the pixels.
PALETTE = {
    "red": (0.85, 0.13, 0.13),
    "orange": (0.95, 0.52, 0.10),
    "yellow": (0.95, 0.84, 0.15),
    "green": (0.18, 0.66, 0.24),
    "blue": (0.14, 0.32, 0.85),
    "purple": (0.52, 0.24, 0.74),
    "pink": (0.96, 0.52, 0.72),
    "brown": (0.50, 0.30, 0.14),
    "white": (0.93, 0.93, 0.93),
    "gray": (0.50, 0.50, 0.50),
    "black": (0.07, 0.07, 0.07),
    "cyan": (0.14, 0.78, 0.84),
}
# The shapes an asset's parts are drawn from (an ellipsoid is a sphere of unequal scales).
SHAPES = ("sphere", "ellipsoid", "box", "cylinder", "cone", "torus")
_SHAPE_WEIGHTS = (0.18, 0.10, 0.22, 0.18, 0.16, 0.16)


@dataclasses.dataclass(frozen=True)
class Primitive:
  """One affine-transformed unit shape."""
  # One of KINDS[1:].
  kind: str
  # [3] world position of the local origin.
  center: np.ndarray
  # [3, 3] local-to-world rotation.
  rotation: np.ndarray
  # [3] scale of each local axis (half-extents of the unit shape).
  scale: np.ndarray
  # [3] rgb in [0, 1]; the only colour of a solid pattern.
  color_a: np.ndarray
  # [3] rgb in [0, 1]; the second colour of stripes and checkers.
  color_b: np.ndarray
  # One of PATTERNS.
  pattern: str = "solid"
  # Pattern cells per unit of the local frame.
  pattern_frequency: float = 2.0
  # Minor radius of a torus (major radius 1), in local units.
  torus_minor: float = 0.0

  def local_to_world(self) -> np.ndarray:
    """``[4, 4]`` affine map from the local frame to the world."""
    matrix = np.eye(4, dtype=np.float64)
    matrix[:3, :3] = self.rotation @ np.diag(self.scale)
    matrix[:3, 3] = self.center
    return matrix

  def local_half_extents(self) -> np.ndarray:
    """``[3]`` half-extents of the unit shape's local bounding box."""
    if self.kind == "torus":
      return np.array([1 + self.torus_minor, 1 + self.torus_minor, self.torus_minor])
    return np.ones(3)

  def bounds(self) -> tuple[np.ndarray, np.ndarray]:
    """World-space ``(lower [3], upper [3])`` bounding box (exact for
    spheres, ellipsoids and axis-aligned shapes, conservative otherwise)."""
    linear = self.rotation @ np.diag(self.scale)
    if self.kind == "sphere":
      half = np.sqrt(np.sum(linear**2, axis=1))
    else:
      half = np.abs(linear) @ self.local_half_extents()
    return self.center - half, self.center + half

  def transformed(self, offset: np.ndarray, factor: float) -> "Primitive":
    """The primitive after ``p -> (p + offset) * factor`` in world space."""
    return dataclasses.replace(self, center=(self.center + offset) * factor,
                               scale=self.scale * factor)


@dataclasses.dataclass(frozen=True)
class ProceduralAsset:
  """A composition of primitives and its caption."""
  # Identifier, stable for a (seed, index) pair.
  asset_id: str
  # English description of the composition.
  caption: str
  # The primitives; the asset is their union.
  primitives: tuple[Primitive, ...]

  def bounds(self) -> tuple[np.ndarray, np.ndarray]:
    lowers, uppers = zip(*(p.bounds() for p in self.primitives))
    return np.min(lowers, axis=0), np.max(uppers, axis=0)


def _rotation_z(angle: float) -> np.ndarray:
  c, s = math.cos(angle), math.sin(angle)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float64)


_LYING = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float64)  # +90 deg about x


_PATTERN_WEIGHTS = (0.6, 0.2, 0.2)


def _pattern_weights(patterns) -> np.ndarray:
  """Probabilities over PATTERNS restricted to ``patterns`` (renormalised)."""
  unknown = set(patterns) - set(PATTERNS)
  if unknown or not patterns:
    raise ValueError(f"patterns must be a non-empty subset of {PATTERNS}, got {patterns}")
  weights = np.array([w if name in patterns else 0.0
                      for name, w in zip(PATTERNS, _PATTERN_WEIGHTS)])
  return weights / weights.sum()


def _shape_weights(shapes) -> np.ndarray:
  """Probabilities over SHAPES restricted to ``shapes`` (renormalised)."""
  unknown = set(shapes) - set(SHAPES)
  if unknown or not shapes:
    raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {shapes}")
  weights = np.array([w if name in shapes else 0.0 for name, w in zip(SHAPES, _SHAPE_WEIGHTS)])
  return weights / weights.sum()


def _sample_shape(rng: np.random.Generator, pattern_weights: np.ndarray,
                  shape_weights: np.ndarray) -> dict:
  """A primitive resting at the origin (bottom at ``z = 0``) and its noun."""
  shape = rng.choice(SHAPES, p=shape_weights)
  size = rng.uniform(0.35, 0.6)
  rotation = np.eye(3)
  minor = 0.0
  if shape == "sphere":
    kind, scale, noun = "sphere", np.full(3, size), "sphere"
  elif shape == "ellipsoid":
    kind, noun = "sphere", "ellipsoid"
    scale = size * rng.uniform(0.55, 1.45, size=3)
  elif shape == "box":
    kind = "box"
    if rng.uniform() < 0.4:
      scale, noun = np.full(3, size * 0.85), "cube"
    else:
      scale, noun = size * rng.uniform(0.45, 1.3, size=3), "box"
  elif shape == "cylinder":
    kind, noun = "cylinder", "cylinder"
    scale = np.array([size, size, size * rng.uniform(0.5, 1.4)])
    if rng.uniform() < 0.3:
      rotation = _LYING
  elif shape == "cone":
    kind, noun = "cone", "cone"
    scale = np.array([size, size, size * rng.uniform(0.8, 1.6)])
  else:
    kind, noun = "torus", "torus"
    minor = rng.uniform(0.22, 0.45)
    scale = np.full(3, size * 0.8)
    if rng.uniform() < 0.35:
      rotation = _LYING
  rotation = _rotation_z(rng.uniform(0, 2 * math.pi)) @ rotation
  color_names = list(PALETTE)
  name_a = color_names[rng.integers(len(color_names))]
  pattern = rng.choice(PATTERNS, p=pattern_weights)
  name_b = name_a
  if pattern != "solid":
    others = [c for c in color_names if c != name_a]
    name_b = others[rng.integers(len(others))]
  primitive = Primitive(
      kind=kind, center=np.zeros(3), rotation=rotation, scale=scale,
      color_a=np.array(PALETTE[name_a]), color_b=np.array(PALETTE[name_b]),
      pattern=str(pattern), pattern_frequency=float(rng.integers(1, 4)),
      torus_minor=float(minor))
  lower, _ = primitive.bounds()
  primitive = dataclasses.replace(primitive, center=np.array([0.0, 0.0, -lower[2]]))
  if pattern == "striped":
    phrase = f"{name_a} and {name_b} striped {noun}"
  elif pattern == "checkered":
    phrase = f"{name_a} and {name_b} checkered {noun}"
  else:
    phrase = f"{name_a} {noun}"
  return {"primitive": primitive, "phrase": phrase}


def _article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _moved(primitive: Primitive, delta: np.ndarray) -> Primitive:
  return dataclasses.replace(primitive, center=primitive.center + delta)


def sample_asset(seed: int, index: int, max_primitives: int = 4,
                 patterns=PATTERNS, shapes=SHAPES) -> ProceduralAsset:
  """The ``index``-th asset of the procedural dataset with ``seed``.

  Args:
    seed: dataset seed.
    index: asset number.
    max_primitives: most primitives in one asset (at least 1).
    patterns: the surface patterns allowed (a subset of ``PATTERNS``); with
      all of them (the default) assets are those of earlier releases.
    shapes: the part shapes allowed (a subset of ``SHAPES``: a family of
      assets); with all of them (the default) assets are those of earlier
      releases.

  Returns:
    A normalised ``ProceduralAsset``; the same arguments give the same asset.
  """
  rng = np.random.default_rng([seed, index, 0x5EED])
  pattern_weights = _pattern_weights(tuple(patterns))
  shape_weights = _shape_weights(tuple(shapes))
  count = int(rng.choice(np.arange(1, max_primitives + 1),
                         p=_count_weights(max_primitives)))
  base = _sample_shape(rng, pattern_weights, shape_weights)
  stack = [base]
  side = []
  for _ in range(count - 1):
    part = _sample_shape(rng, pattern_weights, shape_weights)
    if rng.uniform() < 0.55:
      stack.append(part)
    else:
      side.append(part)
  # Stack each part on the one below: its bottom on the top of the lower box.
  primitives = [base["primitive"]]
  height = base["primitive"].bounds()[1][2]
  for part in stack[1:]:
    placed = _moved(part["primitive"], np.array([0.0, 0.0, height]))
    primitives.append(placed)
    height = placed.bounds()[1][2]
  # Side parts stand on the ground next to the stack, in random directions.
  stack_lower, stack_upper = ProceduralAsset("", "", tuple(primitives)).bounds()
  stack_radius = 0.5 * float(np.max(stack_upper[:2] - stack_lower[:2]))
  angle = rng.uniform(0, 2 * math.pi)
  for part in side:
    lower, upper = part["primitive"].bounds()
    radius = 0.5 * float(np.max(upper[:2] - lower[:2]))
    distance = stack_radius + radius + rng.uniform(0.05, 0.2)
    primitives.append(_moved(part["primitive"],
                             distance * np.array([math.cos(angle), math.sin(angle), 0.0])))
    angle += rng.uniform(0.6, 1.4) * math.pi
  # Normalise: bounding box centred at the origin, longest side 2.
  lower, upper = ProceduralAsset("", "", tuple(primitives)).bounds()
  factor = 2.0 / float(np.max(upper - lower))
  offset = -(lower + upper) / 2
  primitives = tuple(p.transformed(offset, factor) for p in primitives)
  caption = _article(stack[-1]["phrase"])
  for part in reversed(stack[:-1]):
    caption += " on " + _article(part["phrase"])
  for i, part in enumerate(side):
    caption += (" next to " if i == 0 else " and ") + _article(part["phrase"])
  return ProceduralAsset(asset_id=f"procedural-{seed}-{index:08d}", caption=caption,
                         primitives=primitives)


def _count_weights(max_primitives: int) -> np.ndarray:
  weights = np.array([1.0, 1.6, 1.3, 0.8, 0.5, 0.3][:max_primitives]
                     + [0.2] * max(0, max_primitives - 6))
  return weights / weights.sum()


def pack_assets(assets, max_primitives: int) -> dict[str, np.ndarray]:
  """Fixed-size arrays of a batch of assets, as the renderer takes them.

  Args:
    assets: sequence of ``ProceduralAsset`` (or of primitive tuples).
    max_primitives: slots per asset; unused slots have kind 0.

  Returns:
    Dict of float32/int32 arrays with leading dims ``[B, P]``:
    ``kind [B, P]``, ``world_to_local [B, P, 3, 4]``,
    ``normal_to_world [B, P, 3, 3]`` (inverse transpose of the linear part),
    ``torus_minor [B, P]``, ``color_a``/``color_b [B, P, 3]``,
    ``pattern [B, P]``, ``pattern_frequency [B, P]``.
  """
  batch = len(assets)
  packed = {
      "kind": np.zeros((batch, max_primitives), np.int32),
      "world_to_local": np.tile(np.eye(4, dtype=np.float32)[:3], (batch, max_primitives, 1, 1)),
      "normal_to_world": np.tile(np.eye(3, dtype=np.float32), (batch, max_primitives, 1, 1)),
      "torus_minor": np.zeros((batch, max_primitives), np.float32),
      "color_a": np.zeros((batch, max_primitives, 3), np.float32),
      "color_b": np.zeros((batch, max_primitives, 3), np.float32),
      "pattern": np.zeros((batch, max_primitives), np.int32),
      "pattern_frequency": np.ones((batch, max_primitives), np.float32),
  }
  for b, asset in enumerate(assets):
    primitives = asset.primitives if isinstance(asset, ProceduralAsset) else tuple(asset)
    if len(primitives) > max_primitives:
      raise ValueError(f"{len(primitives)} primitives > max_primitives={max_primitives}")
    for p, primitive in enumerate(primitives):
      forward = primitive.local_to_world()
      packed["kind"][b, p] = KIND_CODES[primitive.kind]
      packed["world_to_local"][b, p] = np.linalg.inv(forward)[:3]
      packed["normal_to_world"][b, p] = np.linalg.inv(forward[:3, :3]).T
      packed["torus_minor"][b, p] = primitive.torus_minor
      packed["color_a"][b, p] = primitive.color_a
      packed["color_b"][b, p] = primitive.color_b
      packed["pattern"][b, p] = PATTERN_CODES[primitive.pattern]
      packed["pattern_frequency"][b, p] = primitive.pattern_frequency
  return packed
