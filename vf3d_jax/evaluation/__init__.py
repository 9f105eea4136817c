"""Evaluation metrics of reconstructed views."""

from vf3d_jax.evaluation.metrics import image_metrics
from vf3d_jax.evaluation.metrics import lpips
from vf3d_jax.evaluation.metrics import psnr
from vf3d_jax.evaluation.metrics import ssim
