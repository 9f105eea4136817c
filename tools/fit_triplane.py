r"""Fits a full-size triplane field to one object: a realistic field without the released weights.

  python -m tools.fit_triplane                                  # procedural asset 0 of seed 0
  python -m tools.fit_triplane --asset_seed 3 --asset_index 7 --output data/fits/a.safetensors
  python -m tools.fit_triplane --mesh chair.glb --output data/fits/chair.safetensors
  python -m tools.fit_triplane --show data/fits/procedural-0-00000000.safetensors
  python -m tools.fit_triplane --plane_res 16 --channels 8 --hidden 16 --steps 50 \
      --views 8 --resolution 32 --held_out_resolution 32 --density_resolution 32   # tiny, seconds

Optimises planes ``[3, 64, 64, 80]`` and a decoder of the released shape
(``vf3d_jax.rendering.fit``) against ``--views`` exact renders of a procedural
asset (or of ``--mesh``), then scores ``--held_out_views`` other views rendered
at the released sampling (64 + 64 a ray, "compatible" mode) and measures the
density on a grid over the box. It writes planes, decoder and metadata (asset,
sizes, steps, seconds, held-out PSNR, density range) to ``--output`` as
safetensors, atomically; ``fit.load_fit`` reads it back. ``--show`` prints a
fit's metadata. On 2 CPU cores the default fit takes about 4 minutes.
"""

import dataclasses
import json
import os

from absl import flags
import jax

from vf3d_jax import cli
from vf3d_jax.data import procedural
from vf3d_jax.models import triplane
from vf3d_jax.rendering import fit

_DEFAULTS = fit.FitConfig()
_SEED = flags.DEFINE_integer("asset_seed", 0, "Procedural dataset seed.")
_INDEX = flags.DEFINE_integer("asset_index", 0, "Procedural asset number.")
_PRIMITIVES = flags.DEFINE_integer("max_primitives", 3, "Most primitives of the asset.")
_MESH = flags.DEFINE_string("mesh", "", "Fit a mesh file (.obj, .glb, ...) instead.")
_UP_AXIS = flags.DEFINE_enum("up_axis", "y", ["y", "z"], "The mesh file's up axis.")
_OUTPUT = flags.DEFINE_string("output", "",
                              "Output .safetensors; default data/fits/<asset id>.safetensors.")
_SHOW = flags.DEFINE_string("show", "", "Print the metadata of this fit file and exit.")
_VIEWS = flags.DEFINE_integer("views", 32, "Training views.")
_RESOLUTION = flags.DEFINE_integer("resolution", 128, "Side of the training views.")
_HELD_OUT = flags.DEFINE_integer("held_out_views", 4, "Held-out views scored after the fit.")
_HELD_OUT_RES = flags.DEFINE_integer("held_out_resolution", 128, "Side of the held-out views.")
_DENSITY_RES = flags.DEFINE_integer("density_resolution", 128,
                                    "Side of the grid the density range is measured on.")
_STEPS = flags.DEFINE_integer("steps", _DEFAULTS.steps, "Optimisation steps.")
_BATCH = flags.DEFINE_integer("batch_rays", _DEFAULTS.batch_rays, "Rays a step.")
_PLANE_RES = flags.DEFINE_integer("plane_res", _DEFAULTS.plane_res, "Plane side.")
_CHANNELS = flags.DEFINE_integer("channels", _DEFAULTS.plane_channels, "Plane channels.")
_HIDDEN = flags.DEFINE_integer("hidden", _DEFAULTS.decoder_hidden, "Decoder hidden width.")
_LAYERS = flags.DEFINE_integer("layers", _DEFAULTS.decoder_layers, "Decoder Dense layers.")
_COARSE = flags.DEFINE_integer("num_coarse", _DEFAULTS.num_coarse,
                               "Stratified samples a ray during the fit.")
_FINE = flags.DEFINE_integer("num_fine", _DEFAULTS.num_fine,
                             "Importance samples a ray during the fit.")
_PLANE_LR = flags.DEFINE_float("plane_lr", _DEFAULTS.plane_lr, "Peak learning rate, planes.")
_DECODER_LR = flags.DEFINE_float("decoder_lr", _DEFAULTS.decoder_lr,
                                 "Peak learning rate, decoder.")
_WARMUP = flags.DEFINE_integer("warmup_steps", _DEFAULTS.warmup_steps,
                               "Linear warm-up of the learning rates.")
_FIT_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Initialisation and ray batches.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Steps between progress lines.")


def _show(path):
  decoder_params, planes, metadata = fit.load_fit(path)
  widths = [decoder_params[name]["kernel"].shape[1]
            for name in triplane.decoder_layer_names(decoder_params)]
  print(f"{path}: planes {list(planes.shape)}, decoder {3 * planes.shape[-1]} -> "
        f"{' -> '.join(map(str, widths))}")
  print(json.dumps(metadata, sort_keys=True))


def main(argv):
  del argv
  if _SHOW.value:
    _show(_SHOW.value)
    return
  config = fit.FitConfig(
      plane_res=_PLANE_RES.value, plane_channels=_CHANNELS.value, decoder_hidden=_HIDDEN.value,
      decoder_layers=_LAYERS.value, steps=_STEPS.value, batch_rays=_BATCH.value,
      num_coarse=_COARSE.value, num_fine=_FINE.value, plane_lr=_PLANE_LR.value,
      decoder_lr=_DECODER_LR.value, warmup_steps=_WARMUP.value, seed=_FIT_SEED.value)
  for flag in (_VIEWS, _RESOLUTION, _HELD_OUT, _HELD_OUT_RES, _DENSITY_RES, _LOG_EVERY):
    if flag.value < 1:
      raise ValueError(f"--{flag.name} must be positive, got {flag.value}")
  if _MESH.value:
    asset = {"mesh": os.path.abspath(_MESH.value), "up_axis": _UP_AXIS.value,
             "id": os.path.splitext(os.path.basename(_MESH.value))[0]}
    if not os.path.isfile(_MESH.value):
      raise FileNotFoundError(f"--mesh {_MESH.value}: no such file")
  else:
    sampled = procedural.sample_asset(_SEED.value, _INDEX.value, _PRIMITIVES.value)
    asset = {"seed": _SEED.value, "index": _INDEX.value, "max_primitives": _PRIMITIVES.value,
             "id": sampled.asset_id, "caption": sampled.caption}
  output = _OUTPUT.value or os.path.join("data", "fits", f"{asset['id']}.safetensors")
  fit.check_output(output)

  if _MESH.value:
    train, held_out = fit.mesh_views(_MESH.value, _VIEWS.value, _RESOLUTION.value,
                                     _HELD_OUT.value, _HELD_OUT_RES.value, up_axis=_UP_AXIS.value)
  else:
    train, held_out = fit.procedural_views(_SEED.value, _INDEX.value, _VIEWS.value,
                                           _RESOLUTION.value, _PRIMITIVES.value,
                                           _HELD_OUT.value, _HELD_OUT_RES.value)
  print(f"{asset['id']}: {_VIEWS.value} views at {_RESOLUTION.value}^2, planes "
        f"[3, {config.plane_res}, {config.plane_res}, {config.plane_channels}], decoder "
        f"{3 * config.plane_channels} -> {config.decoder_hidden} x{config.decoder_layers - 1} "
        f"-> 4, {config.steps} steps of {config.batch_rays} rays "
        f"({config.num_coarse} + {config.num_fine} samples)", flush=True)

  def log(step, m):
    print(f"  step {step:>5}  loss {m['loss']:.5f}  mse {m['mse']:.5f}  opacity "
          f"{m['opacity']:.5f}  batch PSNR {m['psnr']:5.2f} dB  {m['seconds']:7.1f} s", flush=True)

  result = fit.fit_field(train, config, log=log, log_every=_LOG_EVERY.value)
  scores = fit.evaluate(result.decoder_params, result.planes, held_out)
  density = fit.density_range(result.decoder_params, result.planes, _DENSITY_RES.value,
                              config.box_size)
  metadata = {
      "asset": asset, "config": dataclasses.asdict(config), "steps": config.steps,
      "seconds": round(result.seconds, 2), "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "final_loss": float(result.losses[-1]),
      "views": {"train": _VIEWS.value, "resolution": _RESOLUTION.value,
                "held_out": _HELD_OUT.value, "held_out_resolution": _HELD_OUT_RES.value},
      "held_out": dict(scores, num_coarse=64, num_fine=64, mode="compatible"),
      "density": dict(density, grid=_DENSITY_RES.value, threshold=1.0,
                      activation="softplus(raw - 1)"),
  }
  fit.save_fit(output, result.decoder_params, result.planes, metadata)
  surface = "crosses" if 0 < density["fraction_above"] < 1 else "does NOT cross"
  print(f"fit: {result.seconds:.1f} s; held-out PSNR {scores['psnr']:.2f} dB "
        f"({scores['object_psnr']:.2f} dB on the object, 64 + 64 compatible, "
        f"{_HELD_OUT.value} views at {_HELD_OUT_RES.value}^2); density "
        f"[{density['min']:.3g}, {density['max']:.3g}] on a {_DENSITY_RES.value}^3 grid, "
        f"{100 * density['fraction_above']:.1f}% above 1.0 ({surface} the mesh threshold)")
  print(f"wrote {output} ({os.path.getsize(output) / 2 ** 20:.2f} MB)")


if __name__ == "__main__":
  cli.run(main)
