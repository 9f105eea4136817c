r"""Benchmark: the mesh's grid, clean-up and texture at the default settings, and the files.

  python -m tools.bench_mesh                                # the demo LRM on an example image
  python -m tools.bench_mesh --checkpoint model.safetensors --image photo.png
  python -m tools.bench_mesh --resolution 128 --texture_size 512 --max_faces 20000  # the demo's
  python -m tools.bench_mesh --fit data/fits/procedural-0-0.safetensors  # a fitted field

One image's planes, then the density grid both ways: every grid point queried
(``density_grid``) against coarse to fine (``density_grid_coarse_to_fine``
with ``--coarse_block``), each with its seconds and field queries, and how far
apart their marching-cubes surfaces are (symmetric Chamfer distance of the
vertices and the largest vertex distance, in voxels; faces of each). Then each
stage of ``Reconstructor.mesh`` timed alone on the full grid (seconds, wall
clock): the density grid, marching cubes with vertex colours
(the released pipeline's output stops here), floater removal, quadric
decimation to ``--max_faces``, the xatlas unwrap, and the bake (unwrap,
rasterise, query the field at every covered texel, dilate). Then the files:
the released pipeline's vertex-coloured OBJ of the raw surface against the
textured GLB and OBJ + MTL + PNG of the cleaned one. Defaults are
``configs/infer.py``'s (512^3, 50,000 faces, 1024^2 texture). JSON on the last
line.

``--fit`` takes the field from ``tools/fit_triplane.py``'s output (planes and a
decoder of the released sizes fitted to one object) instead of an LRM and an
image: the realistic field at real sizes without the released weights.
Queries are decoder evaluations, each reading the three planes once (one
bilinear lookup of 4 texels a plane): plane lookups are three times the
queries.
"""

import glob
import json
import os
import tempfile
import time

from absl import flags
import jax
import numpy as np
from scipy.spatial import cKDTree

from configs import infer as infer_configs
from vf3d_jax import cli
from vf3d_jax import pretrained
from vf3d_jax.inference import mesh as mesh_lib
from vf3d_jax.inference import preprocess
from vf3d_jax.inference import texture as texture_lib
from vf3d_jax.inference.pipeline import Reconstructor
from vf3d_jax.rendering import fit

_DEFAULTS = infer_configs.get_config().mesh
_CHECKPOINT = flags.DEFINE_string("checkpoint", "examples/lrm_tiny.safetensors", "LRM weights.")
_IMAGE = flags.DEFINE_string("image", "", "Input image; default: the first in examples/images.")
_RESOLUTION = flags.DEFINE_integer("resolution", _DEFAULTS.resolution, "Density grid side.")
_MAX_FACES = flags.DEFINE_integer("max_faces", _DEFAULTS.max_faces, "Face budget (0: none).")
_TEXTURE = flags.DEFINE_integer("texture_size", _DEFAULTS.texture_size, "Texture side.")
_MIN_COMPONENT = flags.DEFINE_float("min_component", _DEFAULTS.min_component,
                                    "Floaters: pieces below this fraction of the faces.")
_FIT = flags.DEFINE_string("fit", "", "A fitted field (tools/fit_triplane.py) instead of an LRM.")
_COARSE_BLOCK = flags.DEFINE_integer("coarse_block", _DEFAULTS.coarse_block or 8,
                                     "Grid intervals per block of the coarse-to-fine grid (>= 2).")


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def _sizes(paths) -> int:
  return sum(os.path.getsize(p) for p in paths)


def _surface_distances(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """``(chamfer, largest)`` nearest-vertex distances between two vertex sets.

  Chamfer as ``evaluation.geometry.chamfer_and_fscore``: the mean of both
  directions' mean distances; largest: the symmetric Hausdorff distance.
  """
  to_b = cKDTree(b).query(a)[0]
  to_a = cKDTree(a).query(b)[0]
  return float((to_b.mean() + to_a.mean()) / 2), float(max(to_b.max(), to_a.max()))


def _coarse_to_fine(query, m, block: int, full_seconds: float, full_mesh) -> dict:
  """The coarse-to-fine grid against the full one (its seconds and mesh) on the same field."""
  mesh_lib.density_grid_coarse_to_fine(query, m.resolution, m.threshold, block, m.chunk)  # compile
  (grid, stats), seconds = _timed(lambda: mesh_lib.density_grid_coarse_to_fine(
      query, m.resolution, m.threshold, block, m.chunk))
  fast_mesh = mesh_lib.mesh_from_grid(grid, None, m.threshold)
  del grid
  voxel = 2.0 / (m.resolution - 1)
  chamfer, largest = _surface_distances(full_mesh.vertices, fast_mesh.vertices)
  return {
      "block": block, "margin": mesh_lib.COARSE_MARGIN,
      "seconds": {"full_grid": round(full_seconds, 3), "coarse_to_fine": round(seconds, 3)},
      "speedup": round(full_seconds / seconds, 2),
      "queries": {"full_grid": stats.full_queries, "coarse": stats.coarse_queries,
                  "fine": stats.fine_queries, "coarse_to_fine": stats.queries,
                  "with_padding": stats.padded_queries,
                  "plane_lookups": {"full_grid": 3 * stats.full_queries,
                                    "coarse_to_fine": 3 * stats.queries},
                  "fraction": round(stats.query_fraction, 4)},
      "marked_block_fraction": round(stats.marked_fraction, 4),
      "faces": {"full_grid": len(full_mesh.faces), "coarse_to_fine": len(fast_mesh.faces)},
      "identical": bool(np.array_equal(full_mesh.faces, fast_mesh.faces)
                        and np.array_equal(full_mesh.vertices, fast_mesh.vertices)),
      "chamfer_voxels": round(chamfer / voxel, 6), "hausdorff_voxels": round(largest / voxel, 6),
  }


def main(argv):
  del argv
  config = infer_configs.get_config()
  config.mesh.update(resolution=_RESOLUTION.value, max_faces=_MAX_FACES.value,
                     texture_size=_TEXTURE.value, min_component=_MIN_COMPONENT.value)
  if _FIT.value:
    decoder, planes, _ = fit.load_fit(_FIT.value)
    path, checkpoint = _FIT.value, None
    query = mesh_lib.field_query_fn({"decoder": decoder}, planes)
  else:
    arch, params = pretrained.load_lrm(_CHECKPOINT.value)
    rec = Reconstructor(arch, params, config)
    path, checkpoint = _IMAGE.value or sorted(glob.glob("examples/images/*.png"))[0], _CHECKPOINT.value
    image, _ = preprocess.preprocess_image(path, size=arch.input_size,
                                           foreground_ratio=config.preprocess.foreground_ratio,
                                           matting_fn=config.preprocess.matting)
    planes = jax.block_until_ready(rec.planes(image))
    query = mesh_lib.field_query_fn(params, planes)
  m = config.mesh
  # Compile the query for the chunks the timed grid sends (R^3 points, or m.chunk).
  mesh_lib.density_grid(query, min(m.resolution, int(np.ceil(m.chunk ** (1 / 3)))), m.chunk)
  seconds = {}
  grid, seconds["density_grid"] = _timed(lambda: mesh_lib.density_grid(query, m.resolution,
                                                                        m.chunk))
  raw, seconds["marching_cubes"] = _timed(lambda: mesh_lib.mesh_from_grid(
      grid, query, m.threshold, m.chunk))
  del grid
  grids = _coarse_to_fine(query, m, _COARSE_BLOCK.value, seconds["density_grid"], raw)
  kept, seconds["floaters"] = _timed(lambda: mesh_lib.remove_floaters(raw, m.min_component))
  small, seconds["simplify"] = _timed(lambda: mesh_lib.simplify(kept, m.max_faces, query,
                                                                 m.chunk))
  _, seconds["unwrap"] = _timed(lambda: texture_lib.unwrap(small.vertices, small.faces,
                                                           m.texture_size))
  baked, seconds["bake"] = _timed(lambda: texture_lib.bake_texture(small, query, m.texture_size,
                                                                   chunk=m.chunk))
  with tempfile.TemporaryDirectory() as folder:
    before = mesh_lib.export_mesh(raw, os.path.join(folder, "raw.obj"))
    glb = mesh_lib.export_mesh(baked, os.path.join(folder, "mesh.glb"))
    obj = mesh_lib.export_mesh(baked, os.path.join(folder, "mesh.obj"))
    files = {"raw_vertex_colour_obj_mb": _sizes(before) / 2 ** 20,
             "textured_glb_mb": _sizes(glb) / 2 ** 20,
             "textured_obj_mtl_png_mb": _sizes(obj) / 2 ** 20}
  result = {
      "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "image": path,
      "checkpoint": checkpoint, "planes": list(np.shape(planes)),
      "resolution": m.resolution, "max_faces": m.max_faces,
      "texture_size": m.texture_size,
      "faces": {"marching_cubes": len(raw.faces), "after_floaters": len(kept.faces),
                "after_simplify": len(small.faces)},
      "seconds": {k: round(v, 3) for k, v in seconds.items()},
      "clean_up_and_texture_s": round(seconds["floaters"] + seconds["simplify"]
                                      + seconds["bake"], 3),
      "files_mb": {k: round(v, 3) for k, v in files.items()},
      "coarse_to_fine": grids,
  }
  print(f"{path}: {m.resolution}^3 grid, {len(raw.faces):,} faces -> {len(kept.faces):,} "
        f"(floaters) -> {len(small.faces):,} (simplify), texture {m.texture_size}^2")
  for name, value in seconds.items():
    print(f"  {name:<15} {value:8.2f} s")
  print(f"  simplify + unwrap + bake (with floaters): {result['clean_up_and_texture_s']:.2f} s "
        "(the bake includes its unwrap)")
  for name, value in files.items():
    print(f"  {name:<26} {value:8.2f} MB")
  g, q = grids, grids["queries"]
  print(f"  grid, every point against coarse to fine (blocks of {g['block']}): "
        f"{g['seconds']['full_grid']:.2f} s against {g['seconds']['coarse_to_fine']:.2f} s, "
        f"{g['speedup']:.1f}x")
  print(f"    queries {q['full_grid']:,} against {q['coarse_to_fine']:,} ({q['fraction']:.1%}: "
        f"{q['coarse']:,} coarse + {q['fine']:,} fine in {g['marked_block_fraction']:.1%} of "
        f"the blocks)")
  print(f"    faces {g['faces']['full_grid']:,} against {g['faces']['coarse_to_fine']:,}; "
        f"Chamfer {g['chamfer_voxels']:.3g} voxels, largest distance "
        f"{g['hausdorff_voxels']:.3g} voxels{' (identical meshes)' if g['identical'] else ''}")
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main)
