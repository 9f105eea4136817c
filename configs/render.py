r"""Multi-view renders: procedural assets or mesh files -> record shards.

Variants (the argument after the colon):

* ``procedural`` (default): seeded procedural assets, 16 orbit views + 4 random
  views at 512x512 (2x2 supersampled), ArrayRecord shards of 100 assets::

    python -m tools.render_orbits --config configs/render.py:procedural \
        --config.num_assets=1000 --config.output_dir=/data/vf3d

  -> ``/data/vf3d/procedural/1.0.0/`` (``tfds.data_source("procedural",
  data_dir="/data/vf3d")`` reads it). On 2 CPU cores about 1.3 s an asset at
  256x256 and 6 s at the default 512x512 (16 views, 2x2 supersampled).

* ``meshes``: mesh files (.obj, .glb, .ply, ...), y-up by default::

    python -m tools.render_orbits --config configs/render.py:meshes \
        --config.meshes.glob='/data/objaverse/**/*.glb' --config.output_dir=/data/vf3d

* ``tiny``: 8 procedural assets, 8 + 2 views at 64x64, for smoke tests (seconds).

An interrupted run resumes when started again with the same settings. Every
field is checked before anything is written; mesh files that cannot be loaded
are skipped with a warning (``--config.meshes.strict=True`` stops instead).
"""

import math

import ml_collections

# Field of view of the released model's source camera (fx = 0.75 of the width).
MODEL_FOV_DEGREES = math.degrees(2 * math.atan(0.5 / 0.75))


def get_config(arg: str = "procedural") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # "procedural" or "meshes".
  config.source = "procedural"
  # Records go to output_dir/name/1.0.0/.
  config.output_dir = "outputs/renders"
  config.name = "procedural"
  # Assets to render (meshes: 0 = every matched file).
  config.num_assets = 1000
  config.seed = 0
  config.examples_per_shard = 100
  # "array_record" (random access, what the loader reads) or "tfrecord".
  config.file_format = "array_record"
  # Image side and supersampling (f x f rays a pixel) for anti-aliased alpha.
  config.resolution = 512
  config.supersample = 2
  # Speed knobs (do not change the records).
  config.batch_size = 4
  config.rays_per_chunk = 16384
  config.png_threads = 4
  # Points sampled on each asset's true surface (uniform by area) and stored in its record,
  # for evaluation's geometry scores; 0 stores none.
  config.surface_points = 0
  # Progress bar on stderr (assets done / total, rate, ETA); a line a minute into a log.
  config.progress = True

  config.views = ml_collections.ConfigDict()
  config.views.num_orbit_views = 16
  config.views.num_random_views = 4
  # Camera distance; 0 -> sqrt(3) / sin(fov / 2), the whole [-1, 1]^3 box in
  # view from anywhere (3.12 at the model's field of view).
  config.views.radius = 0.0
  config.views.fov_degrees = MODEL_FOV_DEGREES
  # Per-asset orbit elevation, uniform in [min, max] radians.
  config.views.orbit_elevation_min = 0.0
  config.views.orbit_elevation_max = math.pi / 4
  config.views.random_elevation_min = -math.pi / 12
  config.views.random_elevation_max = math.pi / 3
  # Rotate each orbit by a random azimuth (else view 0 looks from +x).
  config.views.random_azimuth_offset = False

  config.procedural = ml_collections.ConfigDict()
  config.procedural.max_primitives = 4
  # Surface patterns allowed, comma-separated: solid, striped, checkered.
  config.procedural.patterns = "solid,striped,checkered"
  # Part shapes allowed (an asset family), comma-separated: sphere, ellipsoid, box, cylinder,
  # cone, torus.
  config.procedural.shapes = "sphere,ellipsoid,box,cylinder,cone,torus"

  config.meshes = ml_collections.ConfigDict()
  # Comma-separated globs (``**`` allowed).
  config.meshes.glob = ""
  # The files' up axis: "y" (glTF, most OBJ) or "z".
  config.meshes.up_axis = "y"
  config.meshes.texture_size = 512
  # Optional JSON {file path or stem: caption}.
  config.meshes.captions_file = ""
  # Pixel window each triangle is rasterised in (larger ones are split).
  config.meshes.raster_window = 8
  # Stop at a mesh file that cannot be loaded (else skip it with a warning).
  config.meshes.strict = False

  if arg == "procedural":
    pass
  elif arg == "meshes":
    config.source = "meshes"
    config.name = "meshes"
    config.num_assets = 0
  elif arg == "tiny":
    config.name = "tiny"
    config.num_assets = 8
    config.examples_per_shard = 4
    config.resolution = 64
    config.supersample = 1
    config.views.num_orbit_views = 8
    config.views.num_random_views = 2
    config.batch_size = 4
  else:
    raise ValueError(f"unknown variant {arg!r}: procedural, meshes or tiny")
  return config
