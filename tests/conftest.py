"""Test set-up: 4 simulated CPU devices, full-precision matmuls, one compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, hence here.

Many tests compile the same tiny programs (a trainer's step in a first run, its
resume and a subprocess's CLI run): a persistent compilation cache shared by the
whole run (the xdist workers and the subprocesses they start inherit its
folder) compiles each once. It starts empty in every run and is removed at the
end; a compiled program is the same program whether it came from the cache or
not.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vf3d_jax_test_cache_")
  os.environ["VF3D_JAX_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Parity tests compare against float32 PyTorch; XLA's default CPU precision is
# already full, but be explicit so GPU runs of the suite mean the same thing.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  """The process that made the cache folder removes it."""
  if os.environ.get("VF3D_JAX_TEST_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
