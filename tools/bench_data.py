r"""Benchmark: the multi-view data path.

  python -m tools.bench_data                         # defaults below, ~3 min on 2 CPU cores
  python -m tools.bench_data --render_resolutions 64 --render_assets 2 \
      --num_records 32 --decode_batches 4            # small

Measures:
  * loader throughput: records read, decoded and turned into training
    examples a second by the Grain pipeline with ``--workers`` processes
    (source 512^2 + ``--render_views`` supervision views resized to 256^2 and
    cropped to 128^2, white background), after the first batch;
  * procedural renders: assets a second, 16 orbit views at each of
    ``--render_resolutions`` with ``--supersample``^2 rays a pixel, batches of
    ``--render_batch`` assets, after a compile call (JAX's default backend:
    CPU here, the GPU where there is one);
  * mesh renders: a ~10k-triangle torus, 16 views a call.

Records for the loader are ``--num_records`` copies of a few procedural
renders at ``--stored_resolution`` (``--stored_views`` views each).
"""

import json
import shutil
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from vf3d_jax import cli
from vf3d_jax.data import orbits
from vf3d_jax.data import procedural
from vf3d_jax.data import rasterize
from vf3d_jax.data import raytrace

_WORKERS = flags.DEFINE_integer("workers", 2, "Loader worker processes.")
_NUM_RECORDS = flags.DEFINE_integer("num_records", 256, "Records in the loader benchmark.")
_STORED_RESOLUTION = flags.DEFINE_integer("stored_resolution", 512, "Side of stored views.")
_STORED_VIEWS = flags.DEFINE_integer("stored_views", 20, "Views a stored record.")
_RENDER_VIEWS = flags.DEFINE_integer("render_views", 4, "Supervision views a sample.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Loader batch size.")
_DECODE_BATCHES = flags.DEFINE_integer("decode_batches", 16, "Timed loader batches.")
_RENDER_RESOLUTIONS = flags.DEFINE_list("render_resolutions", ["256", "128"],
                                        "Render sides to time.")
_RENDER_ASSETS = flags.DEFINE_integer("render_assets", 8, "Assets timed a resolution.")
_RENDER_BATCH = flags.DEFINE_integer("render_batch", 4, "Assets a render call.")
_SUPERSAMPLE = flags.DEFINE_integer("supersample", 2, "Supersampling factor.")
_MESH = flags.DEFINE_bool("mesh", True, "Also time the mesh rasteriser.")
_LOADER = flags.DEFINE_bool("loader", True, "Time the loader (needs grain and tfds; "
                            "--noloader times rendering alone).")


def _write_records(directory: str) -> str:
  from vf3d_jax.data import records  # pylint: disable=g-import-not-at-top
  from vf3d_jax.data import writer  # pylint: disable=g-import-not-at-top
  spec = orbits.ViewSpec(num_orbit_views=16, num_random_views=_STORED_VIEWS.value - 16)
  distinct = []
  for index in range(4):
    asset = procedural.sample_asset(0, index)
    views = orbits.sample_views(spec, np.random.default_rng(index))
    rgba, _ = raytrace.render_assets(procedural.pack_assets([asset], 4), views["c2w"][None],
                                     views["intrinsics"][None], _STORED_RESOLUTION.value, 1)
    rgba = np.round(np.asarray(rgba[0]) * 255).astype(np.uint8)
    distinct.append(records.MultiViewRecord(
        asset_id=asset.asset_id, caption=asset.caption, source="3d",
        images=[records.encode_png(x) for x in rgba], c2w=views["c2w"],
        intrinsics=views["intrinsics"], azimuth=views["azimuth"],
        elevation=views["elevation"], num_orbit_views=16))
  sink_writer = writer.ShardedWriter(directory, "bench", num_examples=_NUM_RECORDS.value,
                                     examples_per_shard=64)
  for shard in sink_writer.pending_shards():
    with sink_writer.open_shard(shard) as sink:
      for index in sink_writer.shard_range(shard):
        sink.write(records.serialize(distinct[index % len(distinct)]))
  return sink_writer.directory


def bench_loader(folder: str) -> dict:
  from vf3d_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = pipeline.default_config()
  config.datasets = [{"path": folder, "weight": 1.0}]
  config.update(dict(batch_size=_BATCH.value, num_workers=_WORKERS.value,
                     num_render_views=_RENDER_VIEWS.value, input_resolution=512,
                     render_resolution=256, crop_size=128, shard_index=0, shard_count=1))
  iterator = iter(pipeline.make_dataset(config))
  next(iterator)
  start = time.perf_counter()
  for _ in range(_DECODE_BATCHES.value):
    next(iterator)
  seconds = time.perf_counter() - start
  return {"workers": _WORKERS.value, "records_per_s": round(
      _DECODE_BATCHES.value * _BATCH.value / seconds, 1)}


def bench_procedural(resolution: int) -> dict:
  spec = orbits.ViewSpec(num_orbit_views=16)
  batch = _RENDER_BATCH.value
  def call(first):
    assets = [procedural.sample_asset(1, first + i) for i in range(batch)]
    views = [orbits.sample_views(spec, np.random.default_rng(first + i)) for i in range(batch)]
    rgba, _ = raytrace.render_assets(
        procedural.pack_assets(assets, 4), np.stack([v["c2w"] for v in views]),
        np.stack([v["intrinsics"] for v in views]), resolution, _SUPERSAMPLE.value)
    return np.asarray(rgba)
  start = time.perf_counter()
  call(10_000)
  compile_s = time.perf_counter() - start
  calls = max(1, _RENDER_ASSETS.value // batch)
  start = time.perf_counter()
  for c in range(calls):
    call(c * batch)
  seconds = time.perf_counter() - start
  return {"resolution": resolution, "views": 16, "supersample": _SUPERSAMPLE.value,
          "assets_per_s": round(calls * batch / seconds, 3),
          "first_call_s": round(compile_s, 1)}


def bench_mesh(resolution: int) -> dict:
  import trimesh  # pylint: disable=g-import-not-at-top
  from vf3d_jax.data import meshes  # pylint: disable=g-import-not-at-top
  torus = trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=100,
                                 minor_sections=50)
  corners = meshes.normalize_corners(np.asarray(torus.vertices)[np.asarray(torus.faces)])
  count = corners.shape[0]
  mesh = meshes.MeshAsset("torus", "", corners.astype(np.float32),
                          np.full((count, 3, 3), 0.7, np.float32),
                          np.zeros((count, 3, 2), np.float32), np.full(count, -1, np.int32),
                          np.ones((1, 1, 1, 3), np.float32))
  views = orbits.sample_views(orbits.ViewSpec(num_orbit_views=16), np.random.default_rng(0))
  def call():
    rgba, _ = rasterize.render_mesh(mesh, views["c2w"], views["intrinsics"], resolution,
                                    _SUPERSAMPLE.value)
    return np.asarray(rgba)
  call()
  start = time.perf_counter()
  call()
  seconds = time.perf_counter() - start
  return {"mesh_faces": count, "resolution": resolution, "views": 16,
          "supersample": _SUPERSAMPLE.value, "assets_per_s": round(1 / seconds, 3)}


def main(argv):
  del argv
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind})")
  results = {"backend": jax.default_backend()}
  if _LOADER.value:
    directory = tempfile.mkdtemp(prefix="bench_data_")
    try:
      folder = _write_records(directory)
      results["loader"] = bench_loader(folder)
      print(f"loader: {results['loader']['records_per_s']} records/s "
            f"with {_WORKERS.value} workers")
    finally:
      shutil.rmtree(directory, ignore_errors=True)
  results["procedural"] = []
  results["mesh"] = []
  for resolution in (int(r) for r in _RENDER_RESOLUTIONS.value):
    row = bench_procedural(resolution)
    results["procedural"].append(row)
    print(f"procedural {resolution}^2 x16 views (ss{_SUPERSAMPLE.value}): "
          f"{row['assets_per_s']} assets/s (first call {row['first_call_s']} s)")
    if _MESH.value:
      row = bench_mesh(resolution)
      results["mesh"].append(row)
      print(f"mesh {row['mesh_faces']} faces {resolution}^2 x16 views: "
            f"{row['assets_per_s']} assets/s")
  print(json.dumps(results))


if __name__ == "__main__":
  cli.run(main)
