r"""Benchmark: one image -> planes + turntable video + mesh, stage by stage.

  python -m tools.bench_infer                                   # released sizes, random weights
  python -m tools.bench_infer --checkpoint model.safetensors
  python -m tools.bench_infer --variant tiny --views 8 --resolution 64 --mesh_resolution 64  # CPU

Reports per stage (compiled, warm; median of --repeats): planes, video
(``--views`` views at ``--resolution``), density grid + marching cubes, the
time per view, peak device memory, and the PSNR of the fast path's frames
(``configs/infer.py:fast``: bf16 model, bf16 planes and decoder matmuls)
against the float32 compatible-mode frames of the same planes.

Reference (released PyTorch pipeline, one H200): 85 ms planes, 14.9 s for 160
views at 384^2 (91 ms a view, 23.6 GiB peak), 1.4 s + 4.8 s for the 512^3 mesh.
Targets: whole image -> video + mesh <= 2 s, a view <= 8 ms, peak <= 8 GiB,
fast frames >= 40 dB against compatible float32 frames.
"""

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import infer as infer_configs
from configs import lrm as lrm_configs
from vf3d_jax import cli
from vf3d_jax import pretrained
from vf3d_jax.evaluation import metrics
from vf3d_jax.inference.pipeline import Reconstructor
from vf3d_jax.inference import mesh as mesh_lib
from vf3d_jax.models import lrm
from tools.benchmarking import median_seconds, peak_gib

_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Weights; default: random at --variant sizes.")
_VARIANT = flags.DEFINE_string("variant", "vfusion3d", "configs/lrm.py variant for random weights.")
_VIEWS = flags.DEFINE_integer("views", 160, "Turntable views.")
_RESOLUTION = flags.DEFINE_integer("resolution", 384, "Turntable resolution.")
_MESH_RESOLUTION = flags.DEFINE_integer("mesh_resolution", 512, "Density grid resolution.")
_VIEWS_PER_CALL = flags.DEFINE_integer("views_per_call", 8, "Views per compiled render call.")
_CHUNK = flags.DEFINE_integer("chunk", 16384, "Rays per renderer step.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats per stage.")


def _config(variant):
  config = infer_configs.get_config(variant)
  config.render.num_views = _VIEWS.value
  config.render.resolution = _RESOLUTION.value
  config.render.views_per_call = _VIEWS_PER_CALL.value
  config.render.chunk_size = _CHUNK.value
  config.mesh.resolution = _MESH_RESOLUTION.value
  return config


def main(argv):
  del argv
  if _CHECKPOINT.value:
    arch, params = pretrained.load_lrm(_CHECKPOINT.value)
  else:
    arch = lrm.LRMArch.from_dict(lrm_configs.get_config(_VARIANT.value).model.to_dict())
    params = jax.jit(lambda k: lrm.init_params(arch, k))(jax.random.key(0))
  image = np.random.default_rng(0).uniform(size=(arch.input_size, arch.input_size, 3))
  image = image.astype(np.float32)
  key = jax.random.key(0)
  result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "views": _VIEWS.value, "resolution": _RESOLUTION.value,
            "mesh_resolution": _MESH_RESOLUTION.value}

  frames, reference_planes = {}, None
  for variant in ("vfusion3d", "fast"):
    rec = Reconstructor(arch, params, _config(variant))
    planes = rec.planes(image)
    if reference_planes is None:
      reference_planes = planes  # float32 planes: both renderers draw these for the PSNR
    t_planes = median_seconds(lambda: jax.block_until_ready(rec.planes(image)),
                              iters=_REPEATS.value)
    t_video = median_seconds(lambda: rec.turntable(planes, key, progress=False),
                             iters=_REPEATS.value)
    frames[variant] = rec.turntable(reference_planes, key, progress=False)
    grid_query = mesh_lib.field_query_fn(params, planes)
    t_grid = median_seconds(lambda: mesh_lib.density_grid(
        grid_query, rec.config.mesh.resolution, rec.config.mesh.chunk), iters=_REPEATS.value)
    grid = mesh_lib.density_grid(grid_query, rec.config.mesh.resolution, rec.config.mesh.chunk)
    start = time.perf_counter()
    try:
      mesh = mesh_lib.mesh_from_grid(grid, grid_query, rec.config.mesh.threshold,
                                     rec.config.mesh.chunk)
      vertices = len(mesh.vertices)
    except mesh_lib.EmptyMeshError:
      vertices = 0
    t_mc = time.perf_counter() - start
    result[variant] = {
        "planes_ms": round(t_planes * 1e3, 2),
        "video_s": round(t_video, 3),
        "ms_per_view": round(t_video / _VIEWS.value * 1e3, 2),
        "density_grid_s": round(t_grid, 3),
        "marching_cubes_s": round(t_mc, 3),
        "mesh_vertices": vertices,
        "total_s": round(t_planes + t_video + t_grid + t_mc, 3),
    }
  result["fast_vs_fp32_compatible_psnr_db"] = float(jnp.mean(metrics.psnr(
      jnp.asarray(frames["fast"]), jnp.asarray(frames["vfusion3d"]))))
  result["peak_gib"] = peak_gib()
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
