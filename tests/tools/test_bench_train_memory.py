"""The training benchmark's --memory_only mode: XLA's compiled memory, with and without remat."""

import json
import os
import subprocess
import sys

import pytest

from tools import bench_train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_memory_gib_handles_a_missing_analysis():
  row = bench_train.memory_gib(None)
  assert row == {"argument_gib": None, "output_gib": None, "temp_gib": None, "alias_gib": None,
                 "generated_code_gib": None, "peak_gib": None}


def test_memory_gib_peak_counts_aliased_buffers_once():
  class Stats:  # the fields of jax's CompiledMemoryStats this tool reads
    argument_size_in_bytes = 3 * 2**30
    output_size_in_bytes = 2 * 2**30
    temp_size_in_bytes = 5 * 2**30
    alias_size_in_bytes = 2 * 2**30
    generated_code_size_in_bytes = 2**20

  row = bench_train.memory_gib(Stats())
  assert row["peak_gib"] == 8.0 and row["temp_gib"] == 5.0 and row["alias_gib"] == 2.0
  assert row["generated_code_gib"] == round(2**20 / 2**30, 3)


def test_memory_only_compiles_both_settings_and_remat_lowers_temp():
  # One CPU device; 16 + 16 samples in chunks of 256 rays (8 chunks an object), where
  # rematerialising the renderer chunks matters: temp 0.030 against 0.077 GiB on a CPU.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  done = subprocess.run(
      [sys.executable, "-m", "tools.bench_train", "--memory_only", "--variant=tiny", "--batches=2",
       "--resolution=32", "--crop=16", "--samples=16,16", "--chunk=256", "--loss=mse"],
      cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.strip().splitlines()
  row = json.loads(lines[0])
  summary = json.loads("\n".join(lines[1:]))
  assert summary["mode"] == "memory_only" and summary["results"] == [row]
  assert row["batch"] == 2 and row["devices"] == 1
  for setting in ("remat", "no_remat"):
    m = row[setting]
    assert m["temp_gib"] > 0 and m["argument_gib"] > 0 and m["output_gib"] > 0
    assert m["peak_gib"] == pytest.approx(
        m["argument_gib"] + m["output_gib"] + m["temp_gib"] - m["alias_gib"], abs=2e-3)
    assert m["compile_s"] > 0
  # Same state either way; rematerialisation only shrinks the temporaries.
  assert row["remat"]["argument_gib"] == row["no_remat"]["argument_gib"]
  assert row["remat"]["temp_gib"] < row["no_remat"]["temp_gib"]
