"""Training the video model: the image UNet (stage "image") or its temporal adapters.

``train_and_evaluate(config, workdir)`` is the whole job (``python -m
vf3d_jax.train_video`` parses flags and calls it). Per step, for a batch of
orbit clips ``[B, F, R, R, 3]`` and their captions:

* stage ``"image"``: the clips' frames are independent images ``[B F, 1, ...]``
  with their caption (dropped to the empty prompt with probability
  ``p_drop_text + p_drop_both``); the UNet learns to denoise them;
* stage ``"video"``: whole clips, conditioned on the caption and on the first
  frame (its latent at frame 0 plus a frame mask), each dropped for guidance
  as ``train.p_drop_*`` say; only ``train.trainable`` (the adapters) updates.

Only the trainable parameters and their optimizer state are in the train
state: the rest (the frozen image UNet, the VAE, the CLIP text encoder) is
loaded from ``config.init`` / ``config.latent`` / ``config.text`` at start and
passed to the step as constants, so a step computes no gradient for them and
checkpoints stay small. Checkpoints (Orbax, ``workdir/checkpoints``) hold the
train state, the data iterator and the run's config and learning-rate
schedule; the job resumes from the latest one (refusing a changed config
unless told how, see ``loop.resolve_resume``), saves on SIGTERM, stops with a
clear message when the loss or the state is not finite, writes
samples (a PNG grid, an mp4) of held-out clips every ``train.sample_every``
steps with their consistency scores (``consistency_scores``) and the held-out
orbits' direction test (``direction_losses``), and at the end exports the full model to
``workdir/export`` for sampling or the next stage. With ``train.ema_decay`` set,
samples and the export use the moving average of the trained parameters.
"""

from __future__ import annotations

import functools
import os
import shutil
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vf3d_jax.data import pipeline
from vf3d_jax.diffusion import guidance
from vf3d_jax.diffusion import schedule as schedule_lib
from vf3d_jax.evaluation import metrics as metrics_lib
from vf3d_jax.training import loop
from vf3d_jax.training import lrm_data
from vf3d_jax.training import optim
from vf3d_jax.training import sharding
from vf3d_jax.training.loop import Checkpointer, TrainState
from vf3d_jax.training.metric_writer import MetricWriter
from vf3d_jax.video import model as model_lib
from vf3d_jax.video import sampling
from vf3d_jax.weights.rules import flat, unflat

STAGES = ("image", "video")
# What the train step reads; the loader's other keys stay on the host.
BATCH_KEYS = ("frames", "tokens")


def split_params(config, params) -> tuple[dict, dict]:
  """``params`` -> ``(trainable, frozen)`` trees by ``train.trainable/frozen``."""
  trainable, frozen = {}, {}
  for path, leaf in flat(params).items():
    (trainable if optim.is_trained(config.train, path) else frozen)[path] = leaf
  if not trainable:
    raise ValueError(f"train.trainable={config.train.trainable!r} (frozen="
                     f"{config.train.frozen!r}) selects no parameter")
  return unflat(trainable), unflat(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
  """The inverse of :func:`split_params`."""
  return unflat({**flat(frozen), **flat(trainable)})


def _data_config(config, spec: str, *, batch_size: int, seed: int, shard_index: int,
                 shard_count: int, random_start: bool = True):
  data = pipeline.default_config()
  data.example = "orbit"
  data.datasets = lrm_data.parse_datasets(spec)
  data.seed = seed
  data.batch_size = batch_size
  data.num_workers = config.data.num_workers
  data.shard_index = shard_index
  data.shard_count = shard_count
  data.num_frames = config.data.num_frames
  data.frame_resolution = config.data.frame_resolution
  data.random_start = random_start
  data.background = config.data.background
  data.strict = config.data.strict
  return data


class _Select:
  """Keeps the clip and caption (picklable for worker processes)."""

  def __call__(self, batch):
    return {"frames": batch["frames"], "caption": batch["caption"]}


def make_train_iterator(config, *, batch_size: int, seed: int, shard_index: int = 0,
                        shard_count: int = 1):
  """An endless, checkpointable iterator of orbit clips and captions."""
  if not config.data.train:
    raise ValueError("data.train is empty: give orbit record folders as 'path[:weight],...' "
                     "(make them with `python -m tools.render_orbits`)")
  data = _data_config(config, config.data.train, batch_size=batch_size, seed=seed,
                      shard_index=shard_index, shard_count=shard_count)
  return iter(pipeline.make_dataset(data).map(_Select()))


def load_eval_clips(config, count: int) -> dict[str, np.ndarray]:
  """The first ``count`` held-out clips (start at orbit view 0, white background)."""
  data = _data_config(config, config.data.eval, batch_size=count, seed=0, shard_index=0,
                      shard_count=1, random_start=False)
  data.num_workers = 0
  data.num_epochs = 1
  data.drop_remainder = False
  data.background = "white"
  batch = next(iter(pipeline.make_dataset(data)))
  return {"frames": batch["frames"][:count], "caption": batch["caption"][:count]}


def compute_loss(trainable, frozen, encoders, batch, key, *, model: model_lib.VideoModel,
                 config, null_tokens):
  """The diffusion loss of one batch (see the module docstring)."""
  params = merge_params(trainable, frozen)
  key_vae, key_drop, key_loss = jax.random.split(key, 3)
  t = config.train
  x0 = model.encode(encoders, batch["frames"], key=key_vae)
  context = model.context(params, encoders, batch["tokens"])
  null_context = model.context(params, encoders, null_tokens)
  batch_size, frames = x0.shape[:2]
  if config.stage == "image":
    x0 = x0.reshape((batch_size * frames, 1) + x0.shape[2:])
    context = jnp.repeat(context, frames, axis=0)
    placeholder = jnp.zeros((context.shape[0], 1), jnp.float32)
    context, _ = guidance.drop_conditions(key_drop, context, null_context, placeholder,
                                          p_text=t.p_drop_text + t.p_drop_both, p_image=0.0,
                                          p_both=0.0)
    condition = None
  else:
    condition = model.first_frame_condition(x0, jnp.ones((batch_size,), bool))
    context, condition = guidance.drop_conditions(
        key_drop, context, null_context, condition, p_text=t.p_drop_text,
        p_image=t.p_drop_image, p_both=t.p_drop_both)
  model_fn = lambda x_t, timesteps: model.apply(params, x_t, timesteps, context, condition)
  loss, aux = schedule_lib.diffusion_loss(model.schedule, model_fn, x0, key_loss,
                                          weighting=config.diffusion.weighting)
  return loss, {"mean_t": jnp.mean(aux["timesteps"].astype(jnp.float32))}


def train_step(state: TrainState, frozen, encoders, batch, base_key, *, optimizer, schedule,
               loss_fn):
  """One optimisation step of the trainable parameters."""
  key = jax.random.fold_in(base_key, state.step)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, frozen, encoders, batch, key)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads),
             "param_norm": optax.global_norm(params), "update_norm": optax.global_norm(updates),
             "lr": schedule(state.step)}
  return TrainState(state.step + 1, params, opt_state), metrics


def consistency_scores(samples: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  """How well sampled orbits follow the true orbits of their first frames.

  Args:
    samples: ``[B, F, R, R, 3]`` sampled clips in [0, 1].
    truth: ``[B, F, R, R, 3]`` the held-out orbits they started from.

  Returns:
    * ``orbit_psnr`` / ``orbit_ssim``: frame ``k`` of the sample against frame
      ``k`` of the renders, over ``k >= 1``;
    * ``static_psnr`` / ``static_ssim``: the same for the first true frame
      repeated, the score of a model that does not turn the object;
    * ``direction_psnr_gain``: mean over ``k`` (``k != 0, F/2``) of PSNR
      against true frame ``k`` minus PSNR against true frame ``F - k`` (the
      same azimuth turned the other way). Positive when the samples turn the
      object the way the orbit goes; about zero for a static or symmetric
      clip, whatever its image quality;
    * ``orbit_iou`` / ``static_iou`` / ``direction_iou_gain``: the same three
      on silhouettes (pixels further than 0.1 from the white background,
      intersection over union), which colour noise hardly moves;
    * ``direction_iou_gain_max``: the renders' own direction IoU gain, what a
      perfect sample would score: how far the true frames ``k`` and ``F - k``
      differ, i.e. how much turning there is to see in these orbits;
    * ``direction_accuracy``: over the frames whose two directions look
      different (true frames ``k`` and ``F - k`` with silhouette IoU below
      ``DIRECTION_DISTINCT_IOU``; ``direction_frames`` of them), how often the
      sample's silhouette is closer to the right one (ties count half): 1 for
      a sample that always turns the right way, 0 for one that always turns
      the wrong way, exactly 0.5 for any static clip (frames ``k`` and
      ``F - k`` then cancel).
  """
  frames = samples.shape[1]
  pred = jnp.asarray(samples[:, 1:])
  target = jnp.asarray(truth[:, 1:])
  static = jnp.broadcast_to(jnp.asarray(truth[:, :1]), target.shape)
  turned, mirrored = turned_frames(frames)
  turned_samples = jnp.asarray(samples[:, turned])
  forward = metrics_lib.psnr(turned_samples, jnp.asarray(truth[:, turned]))
  backward = metrics_lib.psnr(turned_samples, jnp.asarray(truth[:, mirrored]))
  return {"orbit_psnr": float(jnp.mean(metrics_lib.psnr(pred, target))),
          "orbit_ssim": float(jnp.mean(metrics_lib.ssim(pred, target))),
          "static_psnr": float(jnp.mean(metrics_lib.psnr(static, target))),
          "static_ssim": float(jnp.mean(metrics_lib.ssim(static, target))),
          "direction_psnr_gain": float(jnp.mean(forward - backward)) if turned else 0.0,
          **_silhouette_scores(samples, truth)}


DIRECTION_TIMESTEPS = (300, 500, 700, 900)


def mirrored_order(frames: int) -> np.ndarray:
  """Frame order of the same orbit flown the other way: ``0, F-1, F-2, ..., 1``."""
  return np.concatenate([[0], np.arange(frames - 1, 0, -1)])


@functools.partial(jax.jit, static_argnums=(0,))
def _clip_losses(model: model_lib.VideoModel, params, x0, context, noise, t):
  """Per-clip mean squared error of the model's output on frames ``1..F-1``."""
  condition = model.first_frame_condition(x0, jnp.ones((x0.shape[0],), bool))
  x_t = schedule_lib.add_noise(model.schedule, x0, noise, t)
  target = schedule_lib.training_target(model.schedule, x0, noise, t)
  out = model.apply(params, x_t, t, context, condition).astype(jnp.float32)
  return jnp.mean(jnp.square(out - target)[:, 1:], axis=tuple(range(1, x0.ndim)))


def direction_losses(model: model_lib.VideoModel, params, encoders, frames, prompts, key, *,
                     timesteps=DIRECTION_TIMESTEPS, repeats: int = 2) -> dict[str, np.ndarray]:
  """Denoising losses of true orbits against the same orbits flown backwards.

  A diffusion model's denoising loss estimates (up to constants) the negative
  log-likelihood it gives a clip. Each held-out orbit is scored three ways,
  all conditioned on its true first frame and caption, with the same noise
  and timesteps: ``forward`` (the orbit as rendered), ``mirrored`` (frames
  ``0, F-1, ..., 1``: the same views, turning the other way; the noise is
  permuted with the frames) and ``static`` (the first frame repeated). A model
  that has learnt which way objects turn gives ``mirrored > forward``; one
  that treats frames independently (the identity-initialised adapters) gives
  exactly ``mirrored == forward``, whatever its image quality.

  Args:
    model, params, encoders: the video model.
    frames: ``[B, F, R, R, 3]`` held-out orbits in [0, 1] starting at view 0.
    prompts: their ``B`` captions.
    key: PRNG key for the noise (and the VAE's posterior sample).
    timesteps: diffusion timesteps averaged over.
    repeats: noise draws per timestep.

  Returns:
    ``{"forward", "mirrored", "static"}``, each ``[B]`` float losses averaged
    over timesteps and repeats.
  """
  key_vae, key_noise = jax.random.split(key)
  x0 = model.encode(encoders, jnp.asarray(frames, jnp.float32), key=key_vae)
  order = mirrored_order(x0.shape[1])
  variants = {"forward": (x0, None), "mirrored": (x0[:, order], order),
              "static": (jnp.broadcast_to(x0[:, :1], x0.shape), None)}
  context = model.context(params, encoders, jnp.asarray(model.tokenize(list(prompts))))
  totals = {name: 0.0 for name in variants}
  draws = 0
  for i, timestep in enumerate(timesteps):
    t = jnp.full((x0.shape[0],), int(timestep), jnp.int32)
    for r in range(repeats):
      noise = jax.random.normal(jax.random.fold_in(key_noise, i * repeats + r), x0.shape)
      for name, (clip, permutation) in variants.items():
        n = noise if permutation is None else noise[:, permutation]
        totals[name] = totals[name] + np.asarray(
            _clip_losses(model, params, clip, context, n, t))
      draws += 1
  return {name: total / draws for name, total in totals.items()}


def direction_loss_scores(losses: dict[str, np.ndarray]) -> dict[str, float]:
  """``direction_losses`` -> summary: the gain ``mirrored - forward`` (mean, relative to
  ``forward``, share of clips above 0) and the static clip's loss against the forward one."""
  gain = losses["mirrored"] - losses["forward"]
  return {"direction_loss_gain": float(gain.mean()),
          "direction_loss_gain_relative": float(gain.mean() / losses["forward"].mean()),
          "direction_loss_positive": float((gain > 0).mean()),
          "forward_loss": float(losses["forward"].mean()),
          "mirrored_loss": float(losses["mirrored"].mean()),
          "static_loss": float(losses["static"].mean())}


# Frames whose two turning directions differ this much (silhouette IoU below it)
# count towards ``direction_accuracy``.
DIRECTION_DISTINCT_IOU = 0.8


def silhouette(frames: np.ndarray, threshold: float = 0.1) -> np.ndarray:
  """``[..., R, R, 3]`` frames on white -> ``[..., R, R]`` bool foreground."""
  return np.abs(1.0 - np.asarray(frames, np.float32)).mean(axis=-1) > threshold


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  union = (a | b).sum(axis=(-2, -1))
  return np.where(union > 0, (a & b).sum(axis=(-2, -1)) / np.maximum(union, 1), 1.0)


def turned_frames(frames: int) -> tuple[list[int], list[int]]:
  """The frames ``k`` whose azimuth turned the other way is another frame
  (``k != 0, F/2``), and those other frames ``F - k``."""
  turned = [k for k in range(1, frames) if 2 * k != frames]
  return turned, [(frames - k) % frames for k in turned]


def _direction_ious(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Silhouettes ``[B, F, R, R]`` -> ``[B, K]`` each over the turned frames: the
  IoU gain of sample frame ``k`` against true frame ``k`` over true frame
  ``F - k``, and the IoU of those two true frames."""
  turned, mirrored = turned_frames(true.shape[1])
  pred = pred[:, turned]
  return (_iou(pred, true[:, turned]) - _iou(pred, true[:, mirrored]),
          _iou(true[:, turned], true[:, mirrored]))


def direction_frames(samples: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per clip and turned frame ``k`` (``turned_frames``), ``[B, K]`` each: the
  silhouette IoU gain of sample frame ``k`` against true frame ``k`` over true
  frame ``F - k``, and whether those two true frames look different (IoU below
  ``DIRECTION_DISTINCT_IOU``)."""
  gain, pair_iou = _direction_ious(silhouette(samples), silhouette(truth))
  return gain, pair_iou < DIRECTION_DISTINCT_IOU


def direction_accuracy(gain: np.ndarray, distinct: np.ndarray) -> float:
  """Of the distinct frames, the share turned the right way (ties count half)."""
  if not distinct.any():
    return 0.5
  return float(((gain > 0) + 0.5 * (gain == 0))[distinct].mean())


def _silhouette_scores(samples, truth) -> dict[str, float]:
  pred, true = silhouette(samples), silhouette(truth)
  scores = {"orbit_iou": float(_iou(pred[:, 1:], true[:, 1:]).mean()),
            "static_iou": float(_iou(np.broadcast_to(true[:, :1], true[:, 1:].shape),
                                     true[:, 1:]).mean())}
  gain, pair_iou = _direction_ious(pred, true)
  if not gain.size:
    return {**scores, "direction_iou_gain": 0.0, "direction_iou_gain_max": 0.0,
            "direction_frames": 0, "direction_accuracy": 0.5}
  distinct = pair_iou < DIRECTION_DISTINCT_IOU
  scores["direction_iou_gain"] = float(gain.mean())
  scores["direction_iou_gain_max"] = float((1.0 - pair_iou).mean())
  scores["direction_frames"] = int(distinct.sum())
  scores["direction_accuracy"] = direction_accuracy(gain, distinct)
  return scores


def clip_grid(rows: list[np.ndarray]) -> np.ndarray:
  """``[F, R, R, 3]`` clips -> one image, a clip per row."""
  return np.concatenate([np.concatenate(list(clip), axis=1) for clip in rows], axis=0)


class Sampler:
  """Samples held-out clips during training, scores them and writes them out."""

  def __init__(self, config, model: model_lib.VideoModel, writer: MetricWriter, workdir: str):
    self.config, self.model, self.writer = config, model, writer
    self.folder = os.path.join(workdir, "samples")
    self.options = sampling.SampleOptions.from_config(config.sample)
    self.clips = load_eval_clips(config, config.sample.num_videos) if config.data.eval else None

  def __call__(self, params, encoders, step: int) -> dict[str, float]:
    key = jax.random.key(self.config.seed + 7)
    if self.clips is not None:
      prompts = pipeline.decode_captions(self.clips["caption"])
      truth = self.clips["frames"]
    else:
      prompts = ["an object"] * self.config.sample.num_videos
      truth = None
    video = self.config.stage == "video"
    first = truth[:, 0] if (video and truth is not None) else None
    start = time.perf_counter()
    samples = sampling.sample_clips(self.model, params, encoders, prompts, key,
                                    first_frames=first, options=self.options)
    seconds = time.perf_counter() - start
    scores = {"sample/seconds_per_clip": seconds / len(prompts)}
    if video and truth is not None:
      scores.update({f"sample/{k}": v for k, v in consistency_scores(samples, truth).items()})
      losses = direction_losses(self.model, params, encoders, truth, prompts,
                                jax.random.key(self.config.seed + 11))
      scores.update({f"sample/{k}": v for k, v in direction_loss_scores(losses).items()})
    self.writer.write_scalars(step, scores)
    rows = [r for pair in zip(truth, samples) for r in pair] if truth is not None else list(samples)
    self.writer.write_images(step, {"samples": clip_grid(rows)})
    from vf3d_jax.inference.pipeline import write_video  # pylint: disable=g-import-not-at-top
    os.makedirs(self.folder, exist_ok=True)
    write_video(np.concatenate(list(samples), axis=2) if video else samples[0],
                os.path.join(self.folder, f"samples_{step:07d}.mp4"), self.config.sample.fps)
    logging.info("samples at step %d: %s", step, scores)
    return scores


def _check_config(config, model: model_lib.VideoModel) -> None:
  if config.stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {config.stage!r}")
  arch = model.spec.unet
  has_adapters = arch.temporal_conv or arch.motion_modules or arch.condition_channels
  if config.stage == "image" and has_adapters:
    raise ValueError("stage 'image' trains the image UNet: set model.temporal_conv, "
                     "model.motion_modules to False and model.condition_channels to 0")
  if config.stage == "video" and not arch.condition_channels:
    raise ValueError("stage 'video' needs first-frame conditioning (model.condition_channels)")


def model_params(state: TrainState, frozen) -> dict:
  """The whole model's parameters to sample and export: the trained ones' moving
  average when ``train.ema_decay`` is set, else the trained ones, with the frozen."""
  ema = optim.ema_params(state.opt_state)
  return merge_params(state.params if ema is None else ema, frozen)


def export_model(workdir: str, spec: model_lib.VideoSpec, params) -> str:
  """Writes ``workdir/export`` (replacing an older one) for sampling or the next stage."""
  target = os.path.join(workdir, "export")
  if os.path.exists(target):
    shutil.rmtree(target)
  return model_lib.save_export(target, spec, jax.device_get(params))


def train_and_evaluate(config, workdir: str, resume: str = "check") -> TrainState:
  """Trains (or resumes training) in ``workdir``; returns the final state.

  ``resume``: what a start does with a checkpoint made with another config
  (``loop.RESUME_MODES``).
  """
  loop.check_workdir(workdir)
  with loop.matmul_precision(config):
    return _train(config, workdir, resume)


def _train(config, workdir: str, resume: str) -> TrainState:
  lrm_data.check_datasets(config.data.train, "data.train")
  if config.data.eval:
    lrm_data.check_datasets(config.data.eval, "data.eval")
  mesh = sharding.make_mesh(config.num_devices or None)
  devices = mesh.shape[sharding.DATA_AXIS]
  if config.train.batch_size % devices:
    raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by "
                     f"{devices} devices")
  spec = model_lib.spec_from_config(config)
  model = model_lib.VideoModel(spec, dtype=jnp.dtype(config.dtype), remat=config.train.remat)
  _check_config(config, model)
  # A new run writes nothing until it has started: a workdir without checkpoints stays as it is.
  checkpointer = (Checkpointer(workdir, config)
                  if os.path.isdir(os.path.join(workdir, "checkpoints")) else None)
  latest = checkpointer.latest_step() if checkpointer else None
  run = loop.resolve_resume(config, latest, checkpointer.meta(latest) if latest is not None
                            else None, resume)
  rng = jax.random.key(config.seed)
  params = model_lib.initial_params(model, rng, unet=config.init.unet, motion=config.init.motion)
  trainable, frozen = split_params(config, params)
  del params
  encoders = model.load_encoders()
  optimizer, schedule = optim.make_optimizer(config.train, trainable, run.decay_steps)
  # Every trainable leaf is trained: the optimizer needs no freezing of its own.
  abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                            trainable)
  state_sharding = sharding.tree_shardings(mesh, abstract, config.train.fsdp)
  replicated = sharding.replicated(mesh)
  frozen = jax.device_put(frozen, sharding.tree_shardings(mesh, frozen, config.train.fsdp))
  encoders = jax.device_put(encoders, replicated)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, state_sharding)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpointer or Checkpointer(workdir, config)
  loop.record_start(workdir, config, run, mesh)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=latest)
  iterator = make_train_iterator(config, batch_size=config.train.batch_size // jax.process_count(),
                                 seed=config.seed, shard_index=jax.process_index(),
                                 shard_count=jax.process_count())
  if latest is not None:
    state = checkpointer.restore(latest, abstract, iterator)
    logging.info("resumed from step %d", int(state.step))
  else:
    state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
                    out_shardings=state_sharding)(trainable)
  del trainable
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  logging.info("stage %s: %s trainable, %s frozen parameters, %d devices (%d processes)",
               config.stage, f"{count(state.params):,}", f"{count(frozen):,}", devices,
               jax.process_count())

  null_tokens = jnp.asarray(model.tokenize([""]))
  loss_fn = functools.partial(compute_loss, model=model, config=config, null_tokens=null_tokens)
  step_fn = jax.jit(
      functools.partial(train_step, optimizer=optimizer, schedule=schedule, loss_fn=loss_fn),
      in_shardings=(state_sharding, None, replicated, sharding.batch_sharding(mesh), replicated),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  # Sampling and the export run on process 0 alone, on host copies when several processes
  # hold the arrays (gathering them is collective: every process takes part).
  several = jax.process_count() > 1
  local = lambda tree: sharding.to_host(tree) if several else tree
  sampler = (Sampler(config, model, writer, workdir)
             if config.train.sample_every and jax.process_index() == 0 else None)
  sample_encoders = local(encoders)
  base_key = jax.random.key(config.seed + 1)
  total = config.train.steps
  step = int(state.step)
  meta = lambda: {"step": step, **loop.run_meta(config, run)}
  try:
    last_log, last_log_step = time.perf_counter(), step
    with loop.Preemption() as preemption:
      while step < total:
        raw = next(iterator)
        tokens = model.tokenize(pipeline.decode_captions(raw["caption"]))
        batch = sharding.global_batch(mesh, {"frames": raw["frames"], "tokens": tokens})
        state, metrics = step_fn(state, frozen, encoders, batch, base_key)
        step += 1
        if step % config.train.log_every == 0 or step == total:
          metrics = jax.device_get(metrics)
          loop.check_finite(step, metrics)
          now = time.perf_counter()
          rate = (step - last_log_step) / (now - last_log)
          metrics["clips_per_s"] = rate * config.train.batch_size
          last_log, last_log_step = now, step
          writer.write_scalars(step, metrics)
          logging.info("%s: %s", loop.progress(step, total, rate),
                       ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items())))
        if config.train.sample_every and (step % config.train.sample_every == 0
                                          or step == total):
          params = local(model_params(state, frozen))
          if sampler is not None:
            sampler(params, sample_encoders, step)
          loop.wait_for_processes(f"samples_{step}")
          last_log = time.perf_counter()  # sampling time is not training throughput
        preempted = preemption.reached(step)
        if step % config.train.checkpoint_every == 0 or step == total or preempted:
          checkpointer.save(step, state, iterator, meta(), force=True)
        if preempted:
          logging.warning("SIGTERM: saved step %d, exiting", step)
          break
  finally:
    checkpointer.close()
    writer.close()
  if step >= total:
    params = local(model_params(state, frozen))
    if jax.process_index() == 0:
      path = export_model(workdir, spec, params)
      logging.info("exported the model to %s", path)
    loop.wait_for_processes("export")
  return state
