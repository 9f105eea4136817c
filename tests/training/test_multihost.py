"""Sharded and multi-process LRM training compute what one device computes.

Two steps of the tiny LRM with a global batch of 4 objects, on 1 device, on 4
simulated devices (data parallel, and with FSDP-sharded parameters and
optimizer state), and in two processes of 2 devices each started with
``--distributed`` (a coordinator on 127.0.0.1, CPU collectives), each process
reading its own half of every batch. Losses, gradient norms and parameters
agree to float tolerance: the sums over objects and devices are reduced in
another order, nothing else differs (the data, its randomness and the
renderer's keys are the same per object whatever the layout).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import lrm as lrm_configs
from configs import render as render_configs
from vf3d_jax.data import render_orbits
from vf3d_jax.training import lrm_data
from vf3d_jax.training import lrm_trainer
from vf3d_jax.training import optim
from vf3d_jax.training import sharding

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Float32 sums in another order. The forward pass is the same per object whatever
# the batch (the losses differ by the final mean's order: 4e-7 measured); the
# parameter gradients are sums over objects and devices (gradient norms: 4e-5
# measured, with camera noise; bit-exact without). Adam scales each parameter's
# update to about the learning rate, so where a parameter's two gradients nearly
# cancel, that noise shows as a fraction of the second update's learning rate
# (measured: 0.2 of it, in under 0.1% of the parameters); all others agree within 1e-6.
LOSS_RTOL, GRAD_RTOL, PARAM_ATOL, PARAM_SHARE_OFF = 1e-5, 1e-4, 1e-6, 0.005
OVERRIDES = {"train.steps": 2, "train.stages": ((2, 16, 16, 8, 8),), "train.batch_size": 4,
             "train.num_views": 2, "train.log_every": 1, "train.checkpoint_every": 2,
             "data.eval": ""}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  config = render_configs.get_config("tiny")
  config.output_dir, config.name, config.num_assets = str(tmp_path_factory.mktemp("records")), \
      "train", 8
  config.resolution = 32
  return render_orbits.render_dataset(config)


def _config(records, **fields):
  config = lrm_configs.get_config("tiny")
  config.data.train = records
  for name, value in {**OVERRIDES, **fields}.items():
    section, _, field = name.rpartition(".")
    setattr(config[section] if section else config, field, value)
  return config


def _losses(workdir):
  """``[(step, loss, grad_norm)]`` as logged."""
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(l["step"], l["loss"], l["grad_norm"]) for l in lines if "loss" in l]


def _run(records, workdir, **fields):
  state = lrm_trainer.train_and_evaluate(_config(records, **fields), str(workdir))
  return state, jax.device_get(state.params), _losses(workdir)


@pytest.fixture(scope="module")
def one_device(records, tmp_path_factory):
  return _run(records, tmp_path_factory.mktemp("one"), num_devices=1)


@pytest.fixture(scope="module")
def four_devices(records, tmp_path_factory):
  return _run(records, tmp_path_factory.mktemp("four"), num_devices=4)


def _assert_same_training(a, b):
  (_, params_a, logged_a), (_, params_b, logged_b) = a, b
  assert [l[0] for l in logged_a] == [l[0] for l in logged_b] == [1, 2]
  np.testing.assert_allclose([l[1] for l in logged_a], [l[1] for l in logged_b], rtol=LOSS_RTOL)
  np.testing.assert_allclose([l[2] for l in logged_a], [l[2] for l in logged_b], rtol=GRAD_RTOL)
  second_lr = float(optim.learning_rate_schedule(_config("").train)(1))
  off = []
  for path, x in jax.tree_util.tree_leaves_with_path(params_a):
    y = params_b
    for key in path:
      y = y[key.key]
    np.testing.assert_allclose(x, y, rtol=0, atol=0.5 * second_lr,
                               err_msg=jax.tree_util.keystr(path))
    off.append(np.abs(np.asarray(x) - np.asarray(y)).ravel() > PARAM_ATOL)
  assert np.concatenate(off).mean() < PARAM_SHARE_OFF


def test_each_process_reads_its_block_of_every_global_batch(records):
  """Side by side, the processes' batches are the one-process batches, element for element."""
  data = _config(records).data
  kwargs = dict(num_views=2, input_size=64, render_resolution=16, crop_size=8, seed=3)
  one = lrm_data.make_train_iterator(data, batch_size=4, shard_index=0, shard_count=1, **kwargs)
  halves = [lrm_data.make_train_iterator(data, batch_size=2, shard_index=i, shard_count=2,
                                         **kwargs) for i in range(2)]
  for _ in range(3):  # 12 of the 8 objects: into the second epoch
    batch, parts = next(one), [next(h) for h in halves]
    for key in lrm_data.BATCH_KEYS:
      np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]), key)


def test_four_devices_with_fsdp_train_as_one(records, one_device, tmp_path, monkeypatch):
  """Data parallel over 4 devices with parameters and optimizer state split over them."""
  # The tiny model's tensors are all below the FSDP size threshold: lower it so they split.
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 1024)
  fsdp = _run(records, tmp_path / "fsdp", num_devices=4, **{"train.fsdp": True})
  split = [x for x in jax.tree.leaves(fsdp[0].params) if not x.sharding.is_fully_replicated]
  assert len(split) >= 10, len(split)
  _assert_same_training(one_device, fsdp)


@pytest.mark.slow
def test_four_devices_without_fsdp_train_as_one(one_device, four_devices):
  """Plain data parallel (replicated parameters): the same training as one device."""
  _assert_same_training(one_device, four_devices)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one(records, four_devices, tmp_path):
  """``--distributed``: 2 processes x 2 CPU devices, a global batch of 4, as 1 process x 4."""
  workdir = tmp_path / "two"
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "vf3d_jax.train_lrm", "--config", "configs/lrm.py:tiny",
       "--workdir", str(workdir), f"--config.data.train={records}", *flags, "--distributed",
       f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=400))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  assert "model: 258,932 parameters, 4 devices (2 processes)" in outputs[0][1]
  assert "INFO" not in outputs[1][1] and "step 2/2" not in outputs[1][1]  # process 0 logs alone
  # Only process 0 wrote metrics: each step once. The checkpoint was written by both.
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
                        four_devices[0])
  path = os.path.join(workdir, "checkpoints", "2", "state")
  params = ocp.StandardCheckpointer().restore(path, target).params
  _assert_same_training(four_devices, (None, params, _losses(workdir)))
  data_states = os.listdir(os.path.join(workdir, "checkpoints", "2", "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_states), data_states


# A job that is not multiprocess: process 0 writes and fails; process 1 only waits.
_ALONE_JOB = """
import os
import jax
from vf3d_jax import cli

def main(argv):
  open(os.path.join(os.environ["OUT"], f"written_by_{jax.process_index()}"), "w").close()
  raise ValueError("no images in photos/")

cli.run(main)
"""


def test_other_jobs_run_on_process_0_alone(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen(
      [sys.executable, "-c", _ALONE_JOB, "--distributed", f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in (1, 0)]
  outputs = [p.communicate(timeout=200) for p in procs]
  done = [(p.returncode, err) for p, (_, err) in zip(procs, outputs)]
  assert done == [(1, ""), (1, "error: no images in photos/\n")]  # process 1's code is process 0's
  assert os.listdir(tmp_path) == ["written_by_0"]


def test_distributed_flags_need_distributed(tmp_path):
  done = subprocess.run([sys.executable, "-m", "vf3d_jax.train_lrm", "--workdir", str(tmp_path),
                         "--num_processes=2", "--process_id=0"], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert (done.returncode, done.stderr) == (
      2, "error: --num_processes, --process_id need --distributed\n")
