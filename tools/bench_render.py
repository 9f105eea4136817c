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

With ``--checkpoint`` (and ``--image``) the field is the one an LRM
reconstructs, e.g. the demo model's. With ``--fit`` the field is a fitted one (``tools/fit_triplane.py``: planes
and decoder of the released sizes fitted to an object, so that most of the box
is empty as in a real reconstruction) instead of random planes, which fill the
box with density.

With ``--fast`` (a list of sample budgets: ``coarse+fine`` decoder samples, or
``lattice>decoded`` for the proposal pass, whose coarse samples read the
grid's density lattice) it then compares
the fast mode against compatible on ``--compare_views`` views at
``--resolution`` (float32; compatible jittered by a key as released, the fast
mode at fixed depths unless ``--fast_jitter``; ``--compare_camera``: the
released turntable's or the orbit records'): the compatible reference's seconds a
view, then for each budget the occupancy grid's seconds (once per object), the
seconds a view, the speed-up, PSNR against compatible (and, with
``--fast_bf16``, the same in bfloat16 planes and matmuls), and the work
(``renderer.count_work``: chunks run, decoder evaluations and plane lookups a
view, probes, the grid's evaluations, occupied fractions).

  python -m tools.fit_triplane --output data/fits/procedural-0-0.safetensors
  python -m tools.bench_render --fit data/fits/procedural-0-0.safetensors --views 0 \
      --dtypes float32 --iters 2 --fast 16+16,12+12,8+8 --chunk_size 4096   # CPU, ~2 min

Reference (released PyTorch model, one H200, fp32): 91 ms a 384^2 view; 160-view
turntable 14.9 s, 23.6 GiB peak.
"""

import glob
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import infer as infer_configs
from vf3d_jax import cli
from vf3d_jax import pretrained
from vf3d_jax.inference import preprocess
from vf3d_jax.inference.pipeline import Reconstructor
from vf3d_jax.models.triplane import TriplaneDecoder
from vf3d_jax.data import orbits
from vf3d_jax.rendering import cameras
from vf3d_jax.rendering import fit
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
_FIT = flags.DEFINE_string("fit", "", "A fitted field (tools/fit_triplane.py) instead of random.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "An LRM (e.g. examples/lrm_tiny.safetensors): "
                                  "the field it reconstructs from --image instead of random.")
_IMAGE = flags.DEFINE_string("image", "", "With --checkpoint; default: the first examples image.")
_FAST = flags.DEFINE_list("fast", [], "Fast-mode budgets to compare: coarse+fine (decoder "
                          "samples both), or lattice>decoded (the proposal pass), e.g. 16+16,64>16.")
_COMPARE_VIEWS = flags.DEFINE_integer("compare_views", 1, "Views of the fast comparison.")
_FAST_BF16 = flags.DEFINE_bool("fast_bf16", True, "Also score the fast mode in bfloat16.")
_OCCUPANCY = flags.DEFINE_integer("occupancy_resolution", 128, "Fast mode: grid cells a side.")
_SUBDIVISION = flags.DEFINE_integer("occupancy_subdivision", 1,
                                    "Fast mode: grid density queries a cell side.")
_PROBES = flags.DEFINE_integer("num_probes", 128, "Fast mode: grid probes a ray (0: 2 x cells).")
_FAST_JITTER = flags.DEFINE_bool("fast_jitter", False,
                                 "Jitter the fast mode's samples (the inference config does not).")
_CAMERA = flags.DEFINE_enum(
    "compare_camera", "turntable", ["turntable", "records"],
    "Cameras of the comparison: the released turntable's (radius 1.5, the box fills the view) "
    "or the orbit records' (the box's bounding sphere fills the view, as in training and "
    "evaluation).")


def _field():
  """``(decoder_params, planes, description)``: the fitted field, or random of the flags' sizes."""
  if _FIT.value:
    decoder, planes, meta = fit.load_fit(_FIT.value)
    return (jax.tree.map(jnp.asarray, decoder), jnp.asarray(planes),
            {"fit": _FIT.value, "asset": meta.get("asset")})
  if _CHECKPOINT.value:
    arch, params = pretrained.load_lrm(_CHECKPOINT.value)
    config = infer_configs.get_config()
    path = _IMAGE.value or sorted(glob.glob("examples/images/*.png"))[0]
    image, _ = preprocess.preprocess_image(path, size=arch.input_size,
                                           foreground_ratio=config.preprocess.foreground_ratio,
                                           matting_fn=config.preprocess.matting)
    planes = Reconstructor(arch, params, config).planes(image)
    decoder = jax.tree.map(jnp.asarray, params["synthesizer"]["decoder"])
    return decoder, planes, {"checkpoint": _CHECKPOINT.value, "image": path}
  planes = 0.5 * jax.random.normal(
      jax.random.key(0),
      (3, _PLANE_SIZE.value, _PLANE_SIZE.value, _CHANNELS.value), jnp.float32)
  decoder_params = TriplaneDecoder(hidden=_HIDDEN.value).init(
      jax.random.key(1), jnp.zeros((1, 3 * _CHANNELS.value)))["params"]
  return decoder_params, planes, {"fit": None}


def _psnr(a, b) -> float:
  mse = float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  return round(float("inf") if mse == 0 else -10 * np.log10(mse), 2)


def compare_fast(decoder_params, planes, intrinsics, resolution: int) -> dict:
  """The fast mode against compatible: seconds, PSNR and work a view (module docstring)."""
  views = _COMPARE_VIEWS.value
  if _CAMERA.value == "turntable":
    c2w = cameras.orbit_cameras(views, radius=1.5, azimuth_offset=0.3)
    intrinsics = jnp.broadcast_to(intrinsics, (views, 4))
  else:
    azimuth = 0.3 + np.linspace(0, 2 * np.pi, views, endpoint=False)
    c2w, intrinsics = orbits.cameras_from_angles(
        azimuth, np.full(views, 0.3), orbits.fit_distance(orbits.DEFAULT_FOV_DEGREES),
        orbits.DEFAULT_FOV_DEGREES)
    c2w, intrinsics = jnp.asarray(c2w), jnp.asarray(intrinsics)
  key = jax.random.key(2)
  render = jax.jit(renderer.render_views, static_argnames=("resolution", "options"))
  grid_fn = jax.jit(renderer.occupancy_field, static_argnames=("options",))

  def per_view(options, occupancy=None, jitter=True):
    fn = lambda: render(decoder_params, planes, c2w, intrinsics, resolution,
                        key=key if jitter else None, options=options, occupancy=occupancy)
    timed(fn)  # compile
    seconds = float(np.median([timed(fn) for _ in range(max(1, _ITERS.value))]))
    return fn(), seconds / views

  reference_options = renderer.RenderOptions(chunk_size=_CHUNK.value)
  reference, reference_s = per_view(reference_options)
  work = renderer.count_work(decoder_params, planes, c2w, intrinsics, resolution,
                             reference_options)
  out = {"views": views, "camera": _CAMERA.value, "fast_jitter": _FAST_JITTER.value,
         "occupancy": {"resolution": _OCCUPANCY.value, "subdivision": _SUBDIVISION.value,
                       "probes": _PROBES.value or 2 * _OCCUPANCY.value},
         "compatible": {"samples": [64, 64], "view_s": round(reference_s, 3),
                                        "work_per_view": _per_view(work, views)}, "fast": []}
  for budget in _FAST.value:
    proposal = ">" in budget  # lattice samples > decoded samples
    coarse, fine = (int(n) for n in budget.replace(">", "+").split("+"))
    row = {"samples": [coarse, fine], "proposal": proposal}
    for dtype in ["float32"] + (["bfloat16"] if _FAST_BF16.value else []):
      low = dtype != "float32"
      options = renderer.RenderOptions(
          mode="fast", num_coarse=coarse, num_fine=fine, chunk_size=_CHUNK.value,
          occupancy_resolution=_OCCUPANCY.value, occupancy_subdivision=_SUBDIVISION.value,
          num_probes=_PROBES.value, proposal=proposal, mlp_dtype=dtype,
          planes_dtype=dtype if low else None)
      timed(grid_fn, decoder_params, planes, options)  # compile
      grid_s = timed(grid_fn, decoder_params, planes, options)
      occupancy = grid_fn(decoder_params, planes, options)
      image, seconds = per_view(options, occupancy, jitter=_FAST_JITTER.value)
      psnr = _psnr(image["rgb"], reference["rgb"])
      if low:
        row.update(bf16_view_s=round(seconds, 3), bf16_psnr_db=psnr)
        continue
      work = renderer.count_work(decoder_params, planes, c2w, intrinsics, resolution, options,
                                 occupancy)
      row.update(grid_s=round(grid_s, 3), view_s=round(seconds, 3),
                 speedup=round(reference_s / seconds, 2), psnr_db=psnr,
                 opacity_max_abs=round(float(jnp.max(jnp.abs(
                     image["opacity"] - reference["opacity"]))), 4),
                 work_per_view=_per_view(work, views))
    out["fast"].append(row)
    print(json.dumps(row), flush=True)
  return out


def _per_view(work: dict, views: int) -> dict:
  """Counts a call of ``views`` views made per view (the per-object ones kept as they are)."""
  per_object = ("grid_evaluations", "occupied_fraction", "occupied_length_fraction")
  return {k: (v if k in per_object or isinstance(v, float) else round(v / views))
          for k, v in work.items()}


def main(argv):
  del argv
  jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  decoder_params, planes, field = _field()
  intrinsics = jnp.asarray(cameras.DEFAULT_INTRINSICS)
  resolution = _RESOLUTION.value

  results = []
  for dtype in _DTYPES.value:  # --dtypes= (empty) skips to the comparison
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

  comparison = compare_fast(decoder_params, planes, intrinsics, resolution) if _FAST.value else None
  summary = {
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "resolution": resolution,
      "samples": [_NUM_COARSE.value, _NUM_FINE.value],
      "field": field,
      "planes": list(planes.shape),
      "decoder_hidden": int(decoder_params["net_0"]["kernel"].shape[1]),
      "chunk_size": _CHUNK.value,
      "matmul_precision": _PRECISION.value,
      "results": results,
      "fast_vs_compatible": comparison,
  }
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  cli.run(main)
