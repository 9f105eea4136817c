"""Timing and memory helpers shared by the ``tools/bench_*.py`` benchmarks."""

import time

import jax
import numpy as np


def timed(fn, *args) -> float:
  """Seconds for one call of ``fn(*args)``, waiting for its device work."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def median_seconds(fn, *args, iters: int, warmup: int = 1) -> float:
  """Median of ``iters`` timed calls after ``warmup`` untimed ones (compilation included)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  return float(np.median([timed(fn, *args) for _ in range(iters)]))


def peak_gib() -> float | None:
  """Peak device memory so far, GiB (``None`` where the backend does not report it, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 3)
