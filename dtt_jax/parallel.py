"""Data parallelism: a 1-D ('data',) mesh over all devices (all hosts), batch sharded on it, params replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """Mesh over the first `num_devices` devices (default: every device of every process)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 0 < n <= len(devices):
    raise ValueError(f'num_devices={num_devices} but {len(devices)} devices are available.')
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  """Leading (batch) axis split over devices."""
  return NamedSharding(mesh, P(DATA_AXIS))


def num_shards(mesh) -> int:
  return mesh.shape[DATA_AXIS]


def shard_batch(batch, mesh):
  """Host numpy batch (this process's rows, leading axis) -> global jax arrays sharded on 'data'.

  Single process: the batch is the global batch. Multi-process: each process passes its own slice, in process
  order, and the global batch is their concatenation.
  """
  sharding = data_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


def replicate(tree, mesh):
  return jax.device_put(tree, replicated(mesh))


def check_divisible(batch_size: int, mesh, what: str = 'batch_size') -> None:
  n = num_shards(mesh)
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} must be divisible by the number of devices ({n}).')
