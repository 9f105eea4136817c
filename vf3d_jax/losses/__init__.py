"""Training losses: pixel, opacity, total variation and LPIPS."""

from vf3d_jax.losses.image_losses import OPACITY_LOSS_KINDS
from vf3d_jax.losses.image_losses import l1_loss
from vf3d_jax.losses.image_losses import lpips_loss
from vf3d_jax.losses.image_losses import mse_loss
from vf3d_jax.losses.image_losses import opacity_loss
from vf3d_jax.losses.image_losses import total_variation_loss
from vf3d_jax.losses.lpips import LPIPS
from vf3d_jax.losses.lpips import load_lpips_params
from vf3d_jax.losses.lpips import load_lpips_params_from_torch
from vf3d_jax.losses.lpips import lpips_distance
from vf3d_jax.losses.lpips import save_lpips_params
