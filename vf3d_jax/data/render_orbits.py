"""Renders multi-view records of procedural assets or mesh files.

``render_dataset(config)`` is what ``python -m tools.render_orbits`` runs
(config: ``configs/render.py``). Asset ``i`` and its cameras are pure functions
of ``(config.seed, i)``, so an interrupted run resumes where it stopped and
produces the same records as an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import logging
import math
import os

import ml_collections
import numpy as np

from vf3d_jax.data import meshes
from vf3d_jax.data import orbits
from vf3d_jax.data import procedural
from vf3d_jax.data import rasterize
from vf3d_jax.data import raytrace
from vf3d_jax.data import records
from vf3d_jax.data import writer as writer_lib

_LOG = logging.getLogger(__name__)
# Settings that change how fast records are made, not what they hold.
_NOT_CONTENT = ("output_dir", "batch_size", "rays_per_chunk", "png_threads", "progress")


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
  """Sorted mesh paths matched by ``config.meshes.glob`` (comma-separated)."""
  files = set()
  for pattern in str(config.meshes.glob).split(","):
    if pattern.strip():
      files.update(glob.glob(os.path.expanduser(pattern.strip()), recursive=True))
  return sorted(files)


def _captions(config) -> dict[str, str]:
  path = str(config.meshes.captions_file)
  if not path:
    return {}
  with open(path) as file:
    return json.load(file)


def num_assets(config) -> int:
  if config.source == "procedural":
    return int(config.num_assets)
  available = len(mesh_files(config))
  return available if config.num_assets <= 0 else min(int(config.num_assets), available)


def _render_procedural(config, indices):
  """``[(asset_id, caption, rgba [V, R, R, 4] uint8)]`` for procedural assets."""
  patterns = tuple(p.strip() for p in str(config.procedural.get("patterns", "")).split(",")
                   if p.strip()) or procedural.PATTERNS
  assets = [procedural.sample_asset(int(config.seed), i, int(config.procedural.max_primitives),
                                    patterns) for i in indices]
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
  return [(a.asset_id, a.caption, _to_uint8(x)) for a, x in zip(assets, rgba)], cams


def _render_meshes(config, indices):
  files = mesh_files(config)
  captions = _captions(config)
  out, cams = [], []
  for i in indices:
    path = files[i]
    stem = os.path.splitext(os.path.basename(path))[0]
    mesh = meshes.load_mesh(path, caption=captions.get(path, captions.get(stem, "")),
                            up_axis=str(config.meshes.up_axis),
                            texture_size=int(config.meshes.texture_size))
    views = asset_views(config, i)
    rgba, _ = rasterize.render_mesh(mesh, views["c2w"], views["intrinsics"],
                                    int(config.resolution), int(config.supersample),
                                    int(config.meshes.raster_window))
    out.append((mesh.asset_id, mesh.caption, _to_uint8(np.asarray(rgba))))
    cams.append(views)
  return out, cams


def _to_uint8(rgba: np.ndarray) -> np.ndarray:
  return np.round(np.clip(rgba, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_dataset(config: ml_collections.ConfigDict) -> str:
  """Renders (or finishes rendering) the dataset described by ``config``.

  Returns:
    The dataset folder (``output_dir/name/1.0.0``).
  """
  if config.source not in ("procedural", "meshes"):
    raise ValueError(f"source must be 'procedural' or 'meshes', got {config.source!r}")
  total = num_assets(config)
  if total < 1:
    raise ValueError(f"no assets to render (source={config.source}, "
                     f"glob={config.meshes.glob!r})")
  fingerprint = {k: v for k, v in config.to_dict().items() if k not in _NOT_CONTENT}
  if config.source == "meshes" and view_spec(config).distance <= math.sqrt(3) + 0.01:
    raise ValueError(f"camera distance {view_spec(config).distance} puts cameras inside the "
                     "[-1, 1]^3 box of normalised meshes; use views.radius > 1.75")
  if config.source == "meshes":
    fingerprint["mesh_files"] = mesh_files(config)[:total]
  sink_writer = writer_lib.ShardedWriter(
      str(config.output_dir), str(config.name), num_examples=total,
      examples_per_shard=int(config.examples_per_shard), file_format=str(config.file_format),
      fingerprint=json.loads(json.dumps(fingerprint, default=str)),
      description=f"Multi-view renders ({config.source}) made by vf3d_jax.")
  render = _render_procedural if config.source == "procedural" else _render_meshes
  done = total - sum(len(sink_writer.shard_range(s)) for s in sink_writer.pending_shards())
  progress = None
  if config.progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=total, initial=done, unit="asset", desc=str(config.name))
  batch_size = int(config.batch_size)
  with concurrent.futures.ThreadPoolExecutor(max(1, int(config.png_threads))) as pool:
    for shard in sink_writer.pending_shards():
      with sink_writer.open_shard(shard) as sink:
        indices = list(sink_writer.shard_range(shard))
        for start in range(0, len(indices), batch_size):
          batch = indices[start:start + batch_size]
          rendered, cams = render(config, batch)
          for (asset_id, caption, rgba), views in zip(rendered, cams):
            images = list(pool.map(records.encode_png, list(rgba)))
            sink.write(records.serialize(records.MultiViewRecord(
                asset_id=asset_id, caption=caption, source="3d", images=images,
                c2w=views["c2w"], intrinsics=views["intrinsics"], azimuth=views["azimuth"],
                elevation=views["elevation"], num_orbit_views=int(config.views.num_orbit_views),
                quality=math.nan, elevation_estimate=float(views["orbit_elevation"]))))
          if progress is not None:
            progress.update(len(batch))
  if progress is not None:
    progress.close()
  directory = sink_writer.finalize()
  _LOG.info("Wrote %d records to %s", total, directory)
  return directory
