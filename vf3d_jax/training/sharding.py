"""One explicit device mesh, and the shardings of parameters and batches on it.

The mesh has a single axis, ``data``, over all devices. Batches are split along
it. Parameters are replicated (data parallelism) or, with ``fsdp=True``, each
large tensor is split along its largest dimension divisible by the device count
(ZeRO-3 style; XLA gathers them for the matmuls), which is what lets the
452M-parameter model and its AdamW state fit where replication does not.

With several processes (``jax.distributed``) the mesh spans every process'
devices, each process feeds its own rows of a batch (``global_batch``) and
``to_host`` gathers arrays that no single process holds whole.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
# Tensors below this many elements stay replicated under FSDP.
FSDP_MIN_SIZE = 2 ** 16


def make_mesh(num_devices: int | None = None) -> Mesh:
  devices = jax.devices()
  if num_devices and jax.process_count() > 1 and num_devices != len(devices):
    raise ValueError(f"num_devices={num_devices}: a run of {jax.process_count()} processes "
                     f"uses all {len(devices)} devices (num_devices=0)")
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, have {len(devices)}")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def param_spec(shape, axis_size: int, fsdp: bool) -> P:
  if not fsdp or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % axis_size == 0:
      spec = [None] * len(shape)
      spec[d] = DATA_AXIS
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, shapes, fsdp: bool):
  """``NamedSharding`` for every leaf of a (shape) tree."""
  size = mesh.shape[DATA_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, size, fsdp)), shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, batch: dict) -> dict:
  """Per-process numpy batch -> global arrays split over the data axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def to_host(tree):
  """NumPy copies of the leaves, gathered from every process where no process
  holds a leaf whole (so, with several processes, every process calls it)."""

  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)
