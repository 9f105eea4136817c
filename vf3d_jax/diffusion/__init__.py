"""Diffusion maths: noise schedules, the training loss, samplers and guidance.

Model-agnostic pure functions; a model plugs in as ``model_fn(x_t, t)``.
"""

from vf3d_jax.diffusion.guidance import combine
from vf3d_jax.diffusion.guidance import drop_conditions
from vf3d_jax.diffusion.guidance import guided_model_fn
from vf3d_jax.diffusion.guidance import text_guided_model_fn
from vf3d_jax.diffusion.samplers import Known
from vf3d_jax.diffusion.samplers import ddim_sample
from vf3d_jax.diffusion.samplers import dpm_solver_pp_sample
from vf3d_jax.diffusion.samplers import timesteps_for
from vf3d_jax.diffusion.schedule import Schedule
from vf3d_jax.diffusion.schedule import add_noise
from vf3d_jax.diffusion.schedule import diffusion_loss
from vf3d_jax.diffusion.schedule import make_schedule
from vf3d_jax.diffusion.schedule import predict_eps
from vf3d_jax.diffusion.schedule import predict_x0
from vf3d_jax.diffusion.schedule import rescale_zero_terminal_snr
from vf3d_jax.diffusion.schedule import snr
from vf3d_jax.diffusion.schedule import training_target
from vf3d_jax.diffusion.schedule import velocity
