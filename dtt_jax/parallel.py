"""Data parallelism: a 1-D ('data',) mesh over all devices (all hosts), batch sharded on it, params replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
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


def to_global(tree, mesh):
  """Host arrays that every process holds in full (e.g. prompts all processes built the same way) -> global
  arrays sharded on 'data' (each device takes its rows)."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i, x=np.asarray(x): x[i]),
                      tree)


def to_host(tree):
  """Global (possibly multi-process) arrays -> full numpy arrays on every process."""
  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(fetch, tree)


def replicate(tree, mesh):
  return jax.device_put(tree, replicated(mesh))


def check_divisible(batch_size: int, mesh, what: str = 'batch_size') -> None:
  n = num_shards(mesh)
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} must be divisible by the number of devices ({n}).')
