r"""Benchmark: triplane volume rendering (random planes and decoder, real sizes by default).

  python -m tools.bench_render                  # one 384^2 view + 160-view turntable
  python -m tools.bench_render --resolution 32 --views 4 --plane_size 16 \
      --channels 8 --hidden 16 --chunk_size 1024 --iters 2   # small, CPU

Measures, for each ``--dtypes`` entry (decoder compute dtype; with
``--low_precision_planes`` the planes are sampled in that dtype too):
  * one view at ``--resolution``, 64 + 64 samples a ray: median ms over
    ``--iters`` calls, after a compile/warm-up call;
  * a ``--views`` turntable (radius 1.5, elevation 0, the source camera's
    intrinsics) in one call: total seconds and ms a view;
  * peak device memory (``memory_stats()["peak_bytes_in_use"]``) where the
    backend reports it (GPUs; not CPUs). The peak is the process's so far, so
    later rows include earlier ones; run one dtype at a time for separate peaks.

Planes are ``[3, plane_size, plane_size, channels]`` (released: 64 x 64 x 80), the
decoder ``3*channels -> hidden x3 -> 4`` (released: 240 -> 64 -> 64 -> 64 -> 4).
Noise is drawn from a key, as at inference.

Reference (released PyTorch model, one H200, fp32): 91 ms a 384^2 view; 160-view
turntable 14.9 s, 23.6 GiB peak.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vf3d_jax import cli
from vf3d_jax.models.triplane import TriplaneDecoder
from vf3d_jax.rendering import cameras
from vf3d_jax.rendering import renderer
from tools.benchmarking import peak_gib, timed

_RESOLUTION = flags.DEFINE_integer("resolution", 384, "Image side.")
_VIEWS = flags.DEFINE_integer("views", 160, "Turntable views (0: skip the turntable).")
_PLANE_SIZE = flags.DEFINE_integer("plane_size", 64, "Plane height and width.")
_CHANNELS = flags.DEFINE_integer("channels", 80, "Plane channels.")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Decoder hidden width.")
_NUM_COARSE = flags.DEFINE_integer("num_coarse", 64, "Stratified samples a ray.")
_NUM_FINE = flags.DEFINE_integer("num_fine", 64, "Importance samples a ray.")
_CHUNK = flags.DEFINE_integer("chunk_size", 16384, "Rays evaluated together.")
_MODE = flags.DEFINE_enum("mode", "compatible", renderer.MODES, "Renderer mode.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Decoder compute dtypes.")
_LOW_PLANES = flags.DEFINE_bool("low_precision_planes", True,
                                "Sample the planes in the compute dtype too.")
_PRECISION = flags.DEFINE_enum("matmul_precision", "highest",
                               ["default", "high", "highest"],
                               "jax_default_matmul_precision for float32.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed single-view calls.")


def main(argv):
  del argv
  jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  planes = 0.5 * jax.random.normal(
      jax.random.key(0),
      (3, _PLANE_SIZE.value, _PLANE_SIZE.value, _CHANNELS.value), jnp.float32)
  decoder_params = TriplaneDecoder(hidden=_HIDDEN.value).init(
      jax.random.key(1), jnp.zeros((1, 3 * _CHANNELS.value)))["params"]
  intrinsics = jnp.asarray(cameras.DEFAULT_INTRINSICS)
  resolution = _RESOLUTION.value

  results = []
  for dtype in _DTYPES.value:
    options = renderer.RenderOptions(
        num_coarse=_NUM_COARSE.value, num_fine=_NUM_FINE.value, mode=_MODE.value,
        chunk_size=_CHUNK.value, mlp_dtype=dtype,
        planes_dtype=dtype if _LOW_PLANES.value and dtype != "float32" else None)
    render = jax.jit(lambda p, pl, c2w, k, options=options: renderer.render_views(
        p, pl, c2w, jnp.broadcast_to(intrinsics, (c2w.shape[0], 4)), resolution,
        key=k, options=options))
    row = {"dtype": dtype, "planes_dtype": options.planes_dtype or "float32"}

    one_view = cameras.orbit_cameras(1, radius=1.5, azimuth_offset=0.3)
    key = jax.random.key(2)
    row["view_compile_s"] = round(timed(render, decoder_params, planes, one_view, key), 3)
    times = [timed(render, decoder_params, planes, one_view, key)
             for _ in range(_ITERS.value)]
    row["view_ms"] = round(1e3 * float(np.median(times)), 2)
    row["view_peak_gib"] = peak_gib()

    if _VIEWS.value:
      turntable = cameras.orbit_cameras(_VIEWS.value, radius=1.5)
      row["turntable_compile_s"] = round(
          timed(render, decoder_params, planes, turntable, key), 3)
      seconds = timed(render, decoder_params, planes, turntable, key)
      row["turntable_s"] = round(seconds, 3)
      row["turntable_ms_per_view"] = round(1e3 * seconds / _VIEWS.value, 2)
      row["turntable_peak_gib"] = peak_gib()
    results.append(row)
    print(json.dumps(row), flush=True)

  summary = {
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "resolution": resolution,
      "samples": [_NUM_COARSE.value, _NUM_FINE.value],
      "planes": [3, _PLANE_SIZE.value, _PLANE_SIZE.value, _CHANNELS.value],
      "decoder_hidden": _HIDDEN.value,
      "chunk_size": _CHUNK.value,
      "matmul_precision": _PRECISION.value,
      "results": results,
  }
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  cli.run(main)
