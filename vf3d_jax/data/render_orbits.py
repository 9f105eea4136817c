"""Renders multi-view records of procedural assets or mesh files.

``render_dataset(config)`` is what ``python -m tools.render_orbits`` runs
(config: ``configs/render.py``). Asset ``i`` and its cameras are pure functions
of ``(config.seed, i)``, so an interrupted run resumes where it stopped and
produces the same records as an uninterrupted one. ``validate_config`` checks
every field before anything is read or written, so a mistake in the config
leaves nothing on disk. A mesh file that cannot be loaded is skipped with a
warning (its record is left out of its shard), or stops the run with
``meshes.strict``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import json
import logging
import math
import os
import re

import ml_collections
import numpy as np

from vf3d_jax.data import meshes
from vf3d_jax.data import orbits
from vf3d_jax.data import procedural
from vf3d_jax.data import rasterize
from vf3d_jax.data import raytrace
from vf3d_jax.data import records
from vf3d_jax.data import writer as writer_lib
from vf3d_jax.evaluation import geometry
from vf3d_jax import progress as progress_lib

_LOG = logging.getLogger(__name__)
# Settings that change how fast (or whether) records are made, not what they hold.
_NOT_CONTENT = ("output_dir", "batch_size", "rays_per_chunk", "png_threads", "progress",
                "meshes.strict")
# Cameras closer than this would sit inside the [-1, 1]^3 box of normalised assets.
_MIN_RADIUS = math.sqrt(3) + 0.01


def view_spec(config: ml_collections.ConfigDict) -> orbits.ViewSpec:
  views = config.views
  return orbits.ViewSpec(
      num_orbit_views=int(views.num_orbit_views), num_random_views=int(views.num_random_views),
      radius=float(views.radius) if views.radius > 0 else None,
      fov_degrees=float(views.fov_degrees),
      orbit_elevation_range=(float(views.orbit_elevation_min), float(views.orbit_elevation_max)),
      random_elevation_range=(float(views.random_elevation_min),
                              float(views.random_elevation_max)),
      random_azimuth_offset=bool(views.random_azimuth_offset))


def asset_views(config, index: int) -> dict[str, np.ndarray]:
  """Cameras of asset ``index`` (see ``orbits.sample_views``)."""
  return orbits.sample_views(view_spec(config), np.random.default_rng([config.seed, index, 1]))


def mesh_files(config) -> list[str]:
  """Sorted mesh files matched by ``config.meshes.glob`` (comma-separated)."""
  files = set()
  for pattern in _patterns(config.meshes.glob):
    files.update(glob.glob(os.path.expanduser(pattern), recursive=True))
  return sorted(f for f in files if os.path.isfile(f))


def _patterns(text: str) -> list[str]:
  return [p.strip() for p in str(text).split(",") if p.strip()]


def _captions(config) -> dict[str, str]:
  path = str(config.meshes.captions_file)
  if not path:
    return {}
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.meshes.captions_file: no such file {path}")
  try:
    with open(path) as file:
      captions = json.load(file)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f"config.meshes.captions_file {path}: {error}") from error
  if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
    raise ValueError(f"config.meshes.captions_file {path} must hold a JSON object "
                     "{file path or stem: caption}")
  return captions


def num_assets(config, files: list[str] | None = None) -> int:
  """Assets the config renders (``files``: ``mesh_files(config)``, found again if not given)."""
  if config.source == "procedural":
    return int(config.num_assets)
  available = len(mesh_files(config) if files is None else files)
  return available if config.num_assets <= 0 else min(int(config.num_assets), available)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks a render config before anything is rendered or written.

  Raises:
    ValueError: a field has a value the renderer cannot use (the message
      names the field, as ``config.<field>``).
    FileNotFoundError: ``meshes.glob`` matches no file, or the captions file
      does not exist.
    NotADirectoryError: ``output_dir`` (or ``output_dir/name``) is a file.
  """
  value = lambda field: functools.reduce(getattr, field.split("."), config)

  def require(ok: bool, field: str, rule: str):
    if not ok:
      raise ValueError(f"config.{field} {rule}, got {value(field)!r}")

  def at_least(field: str, minimum: int):
    require(value(field) >= minimum, field,
            "must be positive" if minimum == 1 else f"must be at least {minimum}")

  views = config.views
  require(config.source in ("procedural", "meshes"), "source", "must be 'procedural' or 'meshes'")
  require(bool(str(config.output_dir)), "output_dir", "must name a folder")
  require(re.fullmatch(r"[A-Za-z0-9_]+", str(config.name)) is not None, "name",
          "must be letters, digits and underscores (the dataset's name)")
  at_least("num_assets", 1 if config.source == "procedural" else 0)
  at_least("seed", 0)
  require(config.file_format in writer_lib.FILE_FORMATS, "file_format",
          f"must be one of {', '.join(writer_lib.FILE_FORMATS)}")
  for field in ("examples_per_shard", "resolution", "supersample", "batch_size",
                "rays_per_chunk", "png_threads", "views.num_orbit_views"):
    at_least(field, 1)
  at_least("views.num_random_views", 0)
  at_least("surface_points", 0)
  require(0 < views.fov_degrees < 180, "views.fov_degrees", "must be in (0, 180) degrees")
  require(views.radius == 0 or views.radius > _MIN_RADIUS, "views.radius",
          f"must be 0 (the distance that keeps the whole [-1, 1]^3 box in view) or more than "
          f"{_MIN_RADIUS:.3f}, outside that box")
  require(views.radius > 0 or orbits.fit_distance(views.fov_degrees) > _MIN_RADIUS,
          "views.fov_degrees", "is too wide for views.radius=0 (the cameras would sit in the box)")
  for kind in ("orbit", "random"):
    low, high = f"views.{kind}_elevation_min", f"views.{kind}_elevation_max"
    for field in (low, high):
      require(abs(value(field)) < math.pi / 2, field, "must be in (-pi/2, pi/2) radians")
    require(value(low) <= value(high), low, f"must not exceed config.{high} ({value(high)!r})")
  if config.source == "procedural":
    at_least("procedural.max_primitives", 1)
    patterns = _patterns(config.procedural.patterns)
    require(bool(patterns) and set(patterns) <= set(procedural.PATTERNS), "procedural.patterns",
            f"must list some of {','.join(procedural.PATTERNS)} (comma-separated)")
    shapes = _patterns(config.procedural.shapes)
    require(bool(shapes) and set(shapes) <= set(procedural.SHAPES), "procedural.shapes",
            f"must list some of {','.join(procedural.SHAPES)} (comma-separated)")
  else:
    require(bool(_patterns(config.meshes.glob)), "meshes.glob",
            "must give the mesh files, e.g. 'meshes/**/*.glb' (comma-separated globs)")
    require(config.meshes.up_axis in ("y", "z"), "meshes.up_axis", "must be 'y' or 'z'")
    at_least("meshes.texture_size", 1)
    at_least("meshes.raster_window", 1)
    _captions(config)
    if not mesh_files(config):
      raise FileNotFoundError(f"config.meshes.glob {str(config.meshes.glob)!r} matches no file")
  writer_lib.check_directory(os.path.join(str(config.output_dir), str(config.name)))


def procedural_asset(config, index: int) -> procedural.ProceduralAsset:
  """Asset ``index`` of a procedural render config."""
  return procedural.sample_asset(int(config.seed), index, int(config.procedural.max_primitives),
                                 tuple(_patterns(config.procedural.patterns)),
                                 tuple(_patterns(config.procedural.shapes)))


def _render_procedural(config, indices):
  """``[(asset_id, caption, rgba [V, R, R, 4] uint8, surface [N, 3] | None)]`` for
  procedural assets, and their cameras."""
  assets = [procedural_asset(config, i) for i in indices]
  cams = [asset_views(config, i) for i in indices]
  # Pad the batch to a fixed size so one compiled function serves every batch.
  padding = int(config.batch_size) - len(assets)
  packed = procedural.pack_assets(assets + [assets[-1]] * padding,
                                  int(config.procedural.max_primitives))
  c2w = np.stack([c["c2w"] for c in cams] + [cams[-1]["c2w"]] * padding)
  intrinsics = np.stack([c["intrinsics"] for c in cams] + [cams[-1]["intrinsics"]] * padding)
  rgba, _ = raytrace.render_assets(packed, c2w, intrinsics, int(config.resolution),
                                   int(config.supersample), int(config.rays_per_chunk))
  rgba = np.asarray(rgba)[:len(assets)]
  count = int(config.surface_points)
  surfaces = [geometry.sample_procedural_surface(a, count, seed=i) if count else None
              for a, i in zip(assets, indices)]
  return [(a.asset_id, a.caption, _to_uint8(x), surface)
          for a, x, surface in zip(assets, rgba, surfaces)], cams


def _render_meshes(config, indices, files: list[str], captions: dict[str, str]):
  """``_render_procedural`` for mesh files; a file that cannot be loaded is left out
  with a warning, or raises ``ValueError`` with ``meshes.strict``."""
  out, cams = [], []
  for i in indices:
    path = files[i]
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
      mesh = meshes.load_mesh(path, caption=captions.get(path, captions.get(stem, "")),
                              up_axis=str(config.meshes.up_axis),
                              texture_size=int(config.meshes.texture_size))
    except (ValueError, FileNotFoundError) as error:
      if config.meshes.strict:
        raise ValueError(f"bad mesh {error} (config.meshes.strict=False skips such files)"
                         ) from error
      _LOG.warning("Skipping mesh %d: %s", i, error)
      continue
    views = asset_views(config, i)
    rgba, _ = rasterize.render_mesh(mesh, views["c2w"], views["intrinsics"],
                                    int(config.resolution), int(config.supersample),
                                    int(config.meshes.raster_window))
    surface = None
    if config.surface_points:
      surface = geometry.sample_triangle_surface(mesh.corners, int(config.surface_points), seed=i)
    out.append((mesh.asset_id, mesh.caption, _to_uint8(np.asarray(rgba)), surface))
    cams.append(views)
  return out, cams


def _serialize(config, rendered, views, map_fn=map) -> bytes:
  """One rendered asset's record bytes."""
  asset_id, caption, rgba, surface = rendered
  return records.serialize(records.MultiViewRecord(
      asset_id=asset_id, caption=caption, source="3d",
      images=list(map_fn(records.encode_png, list(rgba))),
      c2w=views["c2w"], intrinsics=views["intrinsics"],
      azimuth=views["azimuth"], elevation=views["elevation"],
      num_orbit_views=int(config.views.num_orbit_views), quality=math.nan,
      elevation_estimate=float(views["orbit_elevation"]), surface=surface))


def asset_record(config, index: int) -> bytes:
  """The record bytes ``render_dataset`` writes for procedural asset ``index``."""
  validate_config(config)
  if config.source != "procedural":
    raise ValueError("asset_record renders procedural assets only")
  rendered, cams = _render_procedural(config, [index])
  return _serialize(config, rendered[0], cams[0])


def _to_uint8(rgba: np.ndarray) -> np.ndarray:
  return np.round(np.clip(rgba, 0.0, 1.0) * 255.0).astype(np.uint8)


def _progress_bar(config, total: int, done: int):
  """Assets done / total with rate and ETA on stderr, or None with ``config.progress`` off.

  On a terminal the bar refreshes in place; into a log it writes a line a minute.
  """
  if not config.progress:
    return None
  return progress_lib.bar(total=total, initial=done, unit="asset", desc=str(config.name))


def render_dataset(config: ml_collections.ConfigDict) -> str:
  """Renders (or finishes rendering) the dataset described by ``config``.

  Returns:
    The dataset folder (``output_dir/name/1.0.0``).

  Raises:
    ValueError, FileNotFoundError, NotADirectoryError: see ``validate_config``;
      also ``ValueError`` when the folder holds complete shards of another
      plan (the message names the fields that differ), when no mesh file
      could be loaded, or, with ``meshes.strict``, at the first that cannot.
  """
  validate_config(config)
  fingerprint = config.to_dict()
  for field in _NOT_CONTENT:
    *parents, leaf = field.split(".")
    functools.reduce(dict.get, parents, fingerprint).pop(leaf, None)
  if config.source == "procedural":
    render = _render_procedural
    total = num_assets(config)
  else:
    files = mesh_files(config)
    total = num_assets(config, files)
    fingerprint["mesh_files"] = files[:total]
    render = functools.partial(_render_meshes, files=files, captions=_captions(config))
  sink_writer = writer_lib.ShardedWriter(
      str(config.output_dir), str(config.name), num_examples=total,
      examples_per_shard=int(config.examples_per_shard), file_format=str(config.file_format),
      fingerprint=json.loads(json.dumps(fingerprint, default=str)),
      description=f"Multi-view renders ({config.source}) made by vf3d_jax.")
  done = total - sum(len(sink_writer.shard_range(s)) for s in sink_writer.pending_shards())
  progress = _progress_bar(config, total, done)
  skipped = sink_writer.num_skipped
  batch_size = int(config.batch_size)
  try:
    with concurrent.futures.ThreadPoolExecutor(max(1, int(config.png_threads))) as pool:
      for shard in sink_writer.pending_shards():
        with sink_writer.open_shard(shard, allow_fewer=config.source == "meshes") as sink:
          indices = list(sink_writer.shard_range(shard))
          for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            rendered, cams = render(config, batch)
            for item, views in zip(rendered, cams):
              sink.write(_serialize(config, item, views, pool.map))
            skipped += len(batch) - len(rendered)
            if progress is not None:
              if skipped:
                progress.set_postfix(skipped=skipped, refresh=False)
              progress.update(len(batch))
  finally:
    if progress is not None:
      progress.close()
  if sink_writer.num_skipped:
    _LOG.warning("Skipped %d of %d mesh files that could not be loaded "
                 "(config.meshes.strict=True stops at the first)", sink_writer.num_skipped, total)
  if not sink_writer.num_written:
    raise ValueError(f"none of the {total} mesh files could be loaded (see the warnings above)")
  directory = sink_writer.finalize()
  _LOG.info("Wrote %d records to %s", sink_writer.num_written, directory)
  return directory
