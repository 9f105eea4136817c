"""Test set-up: 4 simulated CPU devices and full-precision matmuls.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Parity tests compare against float32 PyTorch; XLA's default CPU precision is
# already full, but be explicit so GPU runs of the suite mean the same thing.
jax.config.update("jax_default_matmul_precision", "highest")
