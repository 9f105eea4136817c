r"""Benchmark: the LRM training step of the VFusion3D recipe (random weights, real sizes).

  python -m tools.bench_train                           # released architecture, batches 4 and 16
  python -m tools.bench_train --variant tiny --batches 2,4 --resolution 64 --crop 32 \
      --samples 16,16 --iters 2                         # a CPU smoke run
  python -m tools.bench_train --variant toy --batches 8 --views 2 --resolution 32 --crop 16 \
      --samples 16,16 --dtype float32 --remat=False --chunk 4096 --loss mse   # the toy step

The step is the trainer's own (``vf3d_jax.training.lrm_trainer``): camera noise
on the source camera, image -> triplanes, the supervision crops rendered under
``shard_map``, LPIPS + opacity loss, AdamW with clipping, the state donated.
It is timed on synthetic batches of the trainer's shapes (the data pipeline is
measured by ``tools.bench_data``): ``--views`` supervision views per object,
``--crop``-pixel crops of ``--resolution`` renders, ``--samples`` coarse and fine
samples a ray, ``--dtype`` compute with float32 parameters.

Reference (OpenLRM's PyTorch trainer, one H200, the 452M model, 4 objects x 4
views, 128 crops of 384 renders, 128 samples a ray, bf16 autocast): 0.87 s a
step, 4.6 objects/s, 80.8 GiB peak; 8 objects a step do not fit. Targets: at
least 4x its objects/s, 16 objects a step fitting in memory.

Reports per batch size: seconds a step, objects/s and the ratio to the
reference, peak device memory, and FLOPs: ``model_tflop`` per step counted on
the step without rematerialisation (what the model needs) and ``xla_tflop``
as compiled (rematerialisation included); MFU = model FLOP/s over the device's
dense bf16 peak (``--peak_tflops``, known for common GPUs and TPUs). A batch
that does not fit is reported as such and the next one still runs.

With ``--memory_only`` nothing is run or allocated: for each batch size the
same jitted step is lowered on abstract state and batch (``ShapeDtypeStruct``
with the run's shardings) and compiled twice, with rematerialisation
(``train.remat`` and ``train.remat_renderer``) and without, and XLA's
``compiled.memory_analysis()`` is reported per device: argument, output, temp,
alias and generated-code sizes in GiB, the peak estimate argument + output +
temp - alias, and the seconds to lower and compile (``compile_s``). It needs no accelerator, but the buffer
assignment is the compiling backend's: a CPU's figures are not a GPU's.

  python -m tools.bench_train --memory_only --batches 4,16   # full-size step, compiled memory
"""

import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import lrm as lrm_configs
from tools.benchmarking import median_seconds, peak_gib
from vf3d_jax import cli
from vf3d_jax.models.lrm import count_params, init_params
from vf3d_jax.rendering import cameras
from vf3d_jax.training import lrm_trainer
from vf3d_jax.training import optim
from vf3d_jax.training import sharding
from vf3d_jax.training.loop import TrainState

REFERENCE_OBJECTS_PER_S = 4.6
# Dense bf16 peak TFLOP/s by device kind (substring match, first hit wins).
PEAK_TFLOPS = (("H200", 989.4), ("H100", 989.4), ("A100", 312.0), ("L4", 121.0),
               ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0), ("TPU v4", 275.0))

_VARIANT = flags.DEFINE_string("variant", "vfusion3d", "configs/lrm.py variant.")
_BATCHES = flags.DEFINE_list("batches", ["4", "16"], "Objects per step to measure.")
_VIEWS = flags.DEFINE_integer("views", 4, "Supervision views per object.")
_RESOLUTION = flags.DEFINE_integer("resolution", 384, "Render resolution the crops come from.")
_CROP = flags.DEFINE_integer("crop", 128, "Crop size (pixels rendered per view: crop^2).")
_SAMPLES = flags.DEFINE_list("samples", ["64", "64"], "Coarse,fine samples a ray.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (parameters stay float32).")
_ATTENTION = flags.DEFINE_string("attention", "auto", "auto (cuDNN on GPUs), xla or cudnn.")
_REMAT = flags.DEFINE_bool("remat", True, "Rematerialise transformer blocks and renderer chunks.")
_FSDP = flags.DEFINE_bool("fsdp", False, "Shard parameters and optimizer state over devices.")
_CHUNK = flags.DEFINE_integer("chunk", 32768, "Rays per renderer chunk.")
_LPIPS_DTYPE = flags.DEFINE_string("lpips_dtype", "bfloat16", "LPIPS compute dtype.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed steps per batch size.")
_TRIPLANE_RES = flags.DEFINE_integer("triplane_res", 0, "Triplane tokens a side (0: the variant's).")
_LOSS = flags.DEFINE_enum("loss", "lpips", ["lpips", "mse"],
                          "Image loss: the recipe's LPIPS, or the CPU variants' pixel MSE.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (0: by device kind).")
_MEMORY_ONLY = flags.DEFINE_bool(
    "memory_only", False, "Compile the step with and without rematerialisation and report XLA's "
    "memory analysis instead of timing it; nothing is run or allocated.")


def _config(batch: int):
  config = lrm_configs.get_config(_VARIANT.value)
  config.dtype = _DTYPE.value
  impl = _ATTENTION.value
  if impl == "auto":
    impl = "cudnn" if jax.default_backend() == "gpu" else ""
  config.attention_impl = impl
  t = config.train
  coarse, fine = (int(s) for s in _SAMPLES.value)
  t.stages = ((1, _RESOLUTION.value, _CROP.value, coarse, fine),)
  t.steps, t.warmup_steps, t.batch_size, t.num_views = 1000, 10, batch, _VIEWS.value
  t.remat = t.remat_renderer = _REMAT.value
  t.fsdp = _FSDP.value
  t.render_chunk = _CHUNK.value
  if _TRIPLANE_RES.value:
    config.model.triplane_res = _TRIPLANE_RES.value
  lpips = _LOSS.value == "lpips"
  config.loss.update(lpips=float(lpips), lpips_weights="random:0", lpips_dtype=_LPIPS_DTYPE.value,
                     mse=float(not lpips), l1=0.0, opacity=0.5)
  return config


def synthetic_batch(batch: int, views: int, input_size: int, resolution: int, crop: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of the trainer's shapes: orbit cameras, random crops, random pixels and masks."""
  rng = np.random.default_rng(seed)
  c2w = np.stack([np.asarray(cameras.orbit_cameras(
      views, radius=2.0, elevation=rng.uniform(0, 0.5), azimuth_offset=rng.uniform(0, 6.3)))
                  for _ in range(batch)]).astype(np.float32)
  intrinsics = np.broadcast_to(cameras.DEFAULT_INTRINSICS, (batch, views, 4)).astype(np.float32)
  starts = rng.integers(0, resolution - crop + 1, size=(batch, views, 2))
  crops = np.concatenate([starts, np.full((batch, views, 1), crop)], -1).astype(np.int32)
  source = cameras.camera_conditioning(c2w[:, 0], intrinsics[:, 0], xp=np)
  return {
      "source_image": rng.uniform(size=(batch, input_size, input_size, 3)).astype(np.float32),
      "source_camera": source.astype(np.float32),
      "render_c2w": c2w, "render_intrinsics": intrinsics, "crop": crops,
      "render_rgb": rng.uniform(size=(batch, views, crop, crop, 3)).astype(np.float32),
      "render_mask": (rng.uniform(size=(batch, views, crop, crop)) > 0.5).astype(np.float32),
      "background": np.ones((batch, 3), np.float32)}


def _flops(cost) -> float | None:
  """FLOPs from a ``cost_analysis()`` result (a dict, or a list of them in older JAX)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or "flops" not in cost else float(cost["flops"])


def _peak_tflops(kind: str, override: float = 0.0) -> float | None:
  if override > 0:
    return override
  return next((peak for name, peak in PEAK_TFLOPS if name.lower() in kind.lower()), None)


def _jitted_step(config, model, mesh, *, abstract, stage, optimizer, schedule, lpips_params):
  """The trainer's step, jitted with the state and batch shardings of ``mesh``, state donated."""
  state_sharding = sharding.tree_shardings(mesh, abstract, config.train.fsdp)
  loss_fn = functools.partial(lrm_trainer.compute_losses, model=model, stage=stage,
                              config=config, lpips_params=lpips_params, mesh=mesh)
  return jax.jit(functools.partial(lrm_trainer.train_step, optimizer=optimizer,
                                   schedule=schedule, loss_fn=loss_fn),
                 in_shardings=(state_sharding, sharding.batch_sharding(mesh),
                               sharding.replicated(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def _like(tree, shardings):
  """``jax.ShapeDtypeStruct`` leaves of ``tree``'s shapes and dtypes with ``shardings``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def measure(batch: int) -> dict:
  config = _config(batch)
  mesh = sharding.make_mesh(None)
  arch, model = lrm_trainer.model_from_config(config)
  stage = lrm_trainer.parse_stages(config.train.stages, config.train.steps)[0]
  shapes = jax.eval_shape(lambda: init_params(arch, jax.random.key(0)))
  optimizer, schedule = optim.make_optimizer(config.train, shapes)
  abstract = jax.eval_shape(lambda: TrainState(jnp.zeros((), jnp.int32), shapes,
                                               optimizer.init(shapes)))
  state_sharding = sharding.tree_shardings(mesh, abstract, config.train.fsdp)
  lpips_params = lrm_trainer.load_lpips(config)
  data = sharding.global_batch(mesh, synthetic_batch(
      batch, config.train.num_views, arch.input_size, stage.render_resolution, stage.crop_size))
  key = jax.random.key(0)
  jitted = functools.partial(_jitted_step, abstract=abstract, stage=stage, optimizer=optimizer,
                             schedule=schedule, lpips_params=lpips_params)

  # Model FLOPs: the whole step on one device (so no part is counted per shard),
  # without rematerialisation and with every ray of an object in one renderer
  # chunk (XLA's cost analysis counts a loop body once). Lowered, not compiled.
  plain = _config(batch)
  plain.train.remat = plain.train.remat_renderer = False
  plain.train.render_chunk = config.train.num_views * stage.crop_size ** 2
  plain.train.fsdp = False
  one = sharding.make_mesh(1)
  one_state = _like(abstract, sharding.tree_shardings(one, abstract, False))
  one_data = _like(data, jax.tree.map(lambda _: sharding.batch_sharding(one), data))
  model_flops = _flops(jitted(plain, lrm_trainer.model_from_config(plain)[1], one).lower(
      one_state, one_data, key).cost_analysis())

  result = {"batch": batch}
  try:
    def init_state(rng):
      params = init_params(arch, rng)
      return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(0))
    compiled = jitted(config, model, mesh).lower(state, data, key).compile()
    # Per device for a partitioned step: scale to the whole step.
    xla_flops = _flops(compiled.cost_analysis())
    xla_flops = None if xla_flops is None else xla_flops * len(mesh.devices.flat)

    def run():
      nonlocal state
      state, metrics = compiled(state, data, key)
      return metrics["loss"]

    seconds = median_seconds(run, iters=_ITERS.value, warmup=2)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    return {**result, "fits": False, "error": str(e).splitlines()[0][:200]}
  kind = jax.devices()[0].device_kind
  peak = _peak_tflops(kind, _PEAK.value)
  result.update({
      "fits": True, "step_s": round(seconds, 4), "objects_per_s": round(batch / seconds, 3),
      "vs_reference": round(batch / seconds / REFERENCE_OBJECTS_PER_S, 2),
      "peak_gib": peak_gib(),
      "model_tflop": None if model_flops is None else round(model_flops / 1e12, 3),
      "xla_tflop": None if xla_flops is None else round(xla_flops / 1e12, 3),
      "mfu": (None if model_flops is None or peak is None
              else round(model_flops / seconds / (peak * 1e12 * len(mesh.devices.flat)), 4)),
      "params": count_params(state.params)})
  return result


MEMORY_FIELDS = (("argument_gib", "argument_size_in_bytes"),
                 ("output_gib", "output_size_in_bytes"),
                 ("temp_gib", "temp_size_in_bytes"),
                 ("alias_gib", "alias_size_in_bytes"),
                 ("generated_code_gib", "generated_code_size_in_bytes"))


def memory_gib(stats) -> dict:
  """GiB of a ``compiled.memory_analysis()`` result, and the peak estimate.

  The peak is argument + output + temp - alias (donated arguments that the
  outputs reuse counted once). Every field is None where the backend gives no
  analysis (``stats`` None) or lacks that field.
  """
  raw = {name: getattr(stats, attr, None) for name, attr in MEMORY_FIELDS}
  row = {name: None if v is None else round(v / 2**30, 3) for name, v in raw.items()}
  parts = [raw[k] for k in ("argument_gib", "output_gib", "temp_gib", "alias_gib")]
  row["peak_gib"] = (None if any(v is None for v in parts)
                     else round((parts[0] + parts[1] + parts[2] - parts[3]) / 2**30, 3))
  return row


def compiled_memory(batch: int) -> dict:
  """XLA's compiled memory of the step at ``batch`` objects, with and without rematerialisation.

  The step is ``measure``'s, lowered on abstract state, batch and key (shapes,
  dtypes and shardings only) and compiled, never run.
  """
  mesh = sharding.make_mesh(None)
  result = {"batch": batch, "devices": len(mesh.devices.flat)}
  lpips_params = None
  for remat in (True, False):
    config = _config(batch)
    config.train.remat = config.train.remat_renderer = remat
    if lpips_params is None:
      lpips_params = lrm_trainer.load_lpips(config)
    arch, model = lrm_trainer.model_from_config(config)
    stage = lrm_trainer.parse_stages(config.train.stages, config.train.steps)[0]
    shapes = jax.eval_shape(lambda arch=arch: init_params(arch, jax.random.key(0)))
    optimizer, schedule = optim.make_optimizer(config.train, shapes)
    abstract = jax.eval_shape(lambda shapes=shapes, optimizer=optimizer: TrainState(
        jnp.zeros((), jnp.int32), shapes, optimizer.init(shapes)))
    state = _like(abstract, sharding.tree_shardings(mesh, abstract, config.train.fsdp))
    host = synthetic_batch(batch, config.train.num_views, arch.input_size,
                           stage.render_resolution, stage.crop_size)
    data = _like(host, jax.tree.map(lambda _: sharding.batch_sharding(mesh), host))
    key = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    compiled = _jitted_step(config, model, mesh, abstract=abstract, stage=stage,
                            optimizer=optimizer, schedule=schedule,
                            lpips_params=lpips_params).lower(state, data, key).compile()
    seconds = time.perf_counter() - start
    result["remat" if remat else "no_remat"] = {
        **memory_gib(compiled.memory_analysis()), "compile_s": round(seconds, 1)}
    del compiled
  return result


def main(argv):
  del argv
  rows = []
  for batch in (int(b) for b in _BATCHES.value):
    rows.append(compiled_memory(batch) if _MEMORY_ONLY.value else measure(batch))
    print(json.dumps(rows[-1]), flush=True)
  coarse, fine = (int(s) for s in _SAMPLES.value)
  summary = {
      "variant": _VARIANT.value, "device": jax.devices()[0].device_kind,
      "devices": len(jax.devices()), "dtype": _DTYPE.value, "views": _VIEWS.value,
      "resolution": _RESOLUTION.value, "crop": _CROP.value, "samples": [coarse, fine],
      "remat": _REMAT.value, "fsdp": _FSDP.value,
      "reference_objects_per_s": REFERENCE_OBJECTS_PER_S, "results": rows}
  if _MEMORY_ONLY.value:
    summary.update(mode="memory_only", remat=[True, False], backend=jax.default_backend())
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  cli.run(main)
