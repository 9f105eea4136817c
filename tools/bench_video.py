r"""Benchmark: the video UNet's adapter training step and orbit sampling (random weights).

  python -m tools.bench_video                              # SD 1.5 UNet + adapters, 256x256 clips
  python -m tools.bench_video --variant tiny --batch 2 --iters 3

Measures, in the diffusion space (SD 1.5: 4 x 32 x 32 latents of 256x256
frames; the VAE and the text encoder are left out: they run once per clip):

  * the adapters-only training step (gradients for the temporal adapters
    alone, AdamW, ``--dtype`` compute with float32 parameters): seconds and
    clips/s at ``--batch`` clips of ``--frames`` frames;
  * sampling: seconds per clip for ``--steps`` DDIM steps with two-way
    guidance (three passes per step in one batched call);
  * peak device memory (not reported on CPU).
"""

import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import video as video_configs
from tools.benchmarking import median_seconds, peak_gib
from vf3d_jax import cli
from vf3d_jax.diffusion import guidance
from vf3d_jax.diffusion import samplers
from vf3d_jax.diffusion import schedule as schedule_lib
from vf3d_jax.models import unet as unet_lib
from vf3d_jax.training import optim
from vf3d_jax.training import video_trainer

_VARIANT = flags.DEFINE_string("variant", "sd15", "configs/video.py variant: sd15 or tiny.")
_BATCH = flags.DEFINE_integer("batch", 4, "Clips per training step.")
_FRAMES = flags.DEFINE_integer("frames", 16, "Frames per clip.")
_STEPS = flags.DEFINE_integer("steps", 25, "Sampler steps.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations per measurement.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_REMAT = flags.DEFINE_bool("remat", True, "Rematerialise UNet blocks in the training step.")


def main(argv):
  del argv
  config = video_configs.get_config(_VARIANT.value)
  arch = unet_lib.UNetArch.from_dict(config.model.to_dict())
  size = config.data.frame_resolution // (8 if config.latent.kind == "vae" else 1)
  dtype = jnp.dtype(_DTYPE.value)
  batch, frames = _BATCH.value, _FRAMES.value
  text_length = config.text.max_length
  schedule = schedule_lib.make_schedule(zero_terminal_snr=True, prediction_type="v_prediction")
  params = jax.jit(functools.partial(unet_lib.init_params, arch, frames=2, size=size))(
      jax.random.key(0))
  # config.train.trainable selects the adapters, as in training.
  adapters, frozen = video_trainer.split_params(config, {"unet": params})
  merge = lambda a, f: video_trainer.merge_params(a, f)["unet"]
  optimizer, _ = optim.make_optimizer(config.train, adapters)
  opt_state = optimizer.init(adapters)
  model = unet_lib.UNet(arch, dtype=dtype, remat=_REMAT.value)
  shape = (batch, frames, size, size, arch.in_channels)
  key = jax.random.key(1)
  x0 = jax.random.normal(key, shape)
  context = jax.random.normal(key, (batch, text_length, arch.cross_attention_dim))
  condition = jnp.zeros(shape[:-1] + (arch.condition_channels,))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(adapters, opt_state, frozen, x0, context, condition, key):
    def loss_fn(adapters):
      p = merge(adapters, frozen)
      fn = lambda x, t: model.apply({"params": p}, x, t, context, condition)
      return schedule_lib.diffusion_loss(schedule, fn, x0, key)[0]
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  def run_step():
    nonlocal adapters, opt_state
    adapters, opt_state, loss = step(adapters, opt_state, frozen, x0, context, condition, key)
    return loss

  step_s = median_seconds(run_step, iters=_ITERS.value)
  train_peak = peak_gib()

  @jax.jit
  def sample(params, context, condition, key):
    apply_fn = lambda x, t, c, cond: model.apply({"params": params}, x, t, c, cond)
    model_fn = guidance.guided_model_fn(apply_fn, context=context, context_null=context[:1] * 0,
                                        condition=condition, image_scale=2.0, text_scale=5.0)
    return samplers.ddim_sample(model_fn, schedule, jax.random.normal(key, shape), _STEPS.value)

  params = merge(adapters, frozen)
  adapter_count = unet_lib.count_params(adapters)
  sample_s = median_seconds(sample, params, context, condition, key, iters=max(1, _ITERS.value // 2))
  print(json.dumps({
      "variant": _VARIANT.value, "device": str(jax.devices()[0].device_kind),
      "dtype": _DTYPE.value, "batch": batch, "frames": frames, "latent": list(shape[2:]),
      "unet_params": unet_lib.count_params(params),
      "adapter_params": adapter_count,
      "train_step_s": round(step_s, 4), "train_clips_per_s": round(batch / step_s, 3),
      "train_peak_gib": train_peak, "sample_steps": _STEPS.value,
      "sample_s_per_clip": round(sample_s / batch, 4), "peak_gib": peak_gib()}, indent=1))


if __name__ == "__main__":
  cli.run(main)
