r"""Published procedural benchmarks: named, seeded held-out sets in splits by asset family.

``procedural_v1`` (default): 200 objects, 256x256 records with 16 orbit + 4
random views and 10,000 exact surface points each, in two splits:

* ``seen``: 100 assets of the **narrow** family (spheres, boxes, cylinders):
  the kinds that the toy-scale "3D data" covers;
* ``unseen``: 100 assets of the **unseen** family (ellipsoids, cones, tori):
  kinds that 3D data of the narrow family never shows.

Both use every colour and pattern and up to 3 parts, as the broad family does.
Their seeds (1001, 1002) are reserved: training data must use others. One
command regenerates them with the pinned versions (the same objects, cameras
and captions; pixels equal up to last-bit float differences between CPUs)::

  python -m tools.make_benchmark --config configs/benchmark.py:procedural_v1 \
      --config.output_dir=data/benchmarks

-> ``data/benchmarks/procedural_v1/{seen,unseen}/1.0.0/`` and the object list
``data/benchmarks/procedural_v1/objects.tsv`` (split, family, id, caption, and
each object's fingerprint: mean opacity and mean colour over its views), which
must match ``docs/benchmarks/procedural_v1.tsv`` (ids and captions exactly,
fingerprints within ``tools.make_benchmark.FINGERPRINT_ATOL``).

``tiny``: the same two families, 4 assets each at 64x64 with 8 + 2 views, for tests.
"""

import ml_collections

from configs import render as render_configs

# Asset families: the part shapes each may use (see vf3d_jax.data.procedural.SHAPES).
FAMILIES = {
    "broad": ("sphere", "ellipsoid", "box", "cylinder", "cone", "torus"),
    "narrow": ("sphere", "box", "cylinder"),
    "unseen": ("ellipsoid", "cone", "torus"),
}
MAX_PRIMITIVES = 3


def split_config(family: str, seed: int, num_assets: int, resolution: int,
                 surface_points: int) -> ml_collections.ConfigDict:
  """The render config of one split (configs/render.py's procedural variant)."""
  config = render_configs.get_config("procedural")
  config.seed = seed
  config.num_assets = num_assets
  config.resolution = resolution
  config.surface_points = surface_points
  config.procedural.shapes = ",".join(FAMILIES[family])
  config.procedural.max_primitives = MAX_PRIMITIVES
  config.progress = True
  return config


def get_config(arg: str = "procedural_v1") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = arg
  # Splits go to output_dir/name/<split>/1.0.0/.
  config.output_dir = "data/benchmarks"
  config.splits = ml_collections.ConfigDict()
  if arg == "procedural_v1":
    config.splits.seen = split_config("narrow", 1001, 100, 256, 10_000)
    config.splits.unseen = split_config("unseen", 1002, 100, 256, 10_000)
  elif arg == "tiny":
    for split, family, seed in (("seen", "narrow", 1001), ("unseen", "unseen", 1002)):
      c = split_config(family, seed, 4, 64, 2_000)
      c.supersample = 1
      c.examples_per_shard = 4
      c.views.num_orbit_views, c.views.num_random_views = 8, 2
      c.progress = False
      config.splits[split] = c
  else:
    raise ValueError(f"unknown benchmark {arg!r}: procedural_v1 or tiny")
  # The family of each split, by name (reports and the toy-scale study read it).
  config.families = ml_collections.ConfigDict(
      {split: family for split, family in (("seen", "narrow"), ("unseen", "unseen"))})
  return config
