"""Data and fully-sharded data parallelism on a 2-D ('data', 'fsdp') mesh over all devices (all hosts).

* Batches: the leading (row) axis is split over both axes, P(('data', 'fsdp')): `num_shards(mesh)` = data * fsdp
  shards, row-major (device (d, f) holds shard d * fsdp + f), so each shard is a contiguous block of rows.
* State (parameters, gradients, optimizer state): each array is laid out by the rule table below along 'fsdp' and
  replicated along 'data'. With fsdp = 1 every array is replicated: plain data parallelism.

Rule table (`param_spec`, shapes only; optax states mirror the parameters' shapes, so they follow the same rule):

    array                                           spec
    -----------------------------------------------------------------------------------------------------
    fsdp == 1                                       P()             replicated
    fewer than MIN_SHARDED_SIZE (2**10) elements    P()             biases, norms, step counters, RNG key data
    no dimension divisible by fsdp                  P()
    otherwise                                       'fsdp' on the largest dimension divisible by fsdp (the
                                                    first of equal ones): [D,4D] -> P(None,'fsdp'),
                                                    [V,D] -> P('fsdp',None) (D when V is not divisible)

The jitted steps take these layouts as in/out shardings (`jit_sharded`), gather the parameters before the forward
pass (`gather`: XLA's all-gather) and lay the gradients out like the parameters (`scatter`: a reduce-scatter), so
between steps each device holds 1/fsdp of the parameters and optimizer state; inside a step the whole parameters
(and their gradient) exist for a moment on every device. A step traced under `gathers_per_layer(mesh)` gathers all
but the trunk's blocks up front and lets each block gather its own parameters when it runs (`gather_layer`,
`model/blocks.py`), so that one or two layers' full weights exist at a time where the scheduler keeps to the order
(XLA's CPU backend does not; docs/scaling.md); the bootstrap's recurrent step leaves the
vocabulary tables sharded (`train/grads.py`). `spec_table` prints the table of a given tree.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch's leading axis is split over both
MIN_SHARDED_SIZE = 2**10  # smaller arrays stay replicated: sharding them saves little and costs a collective
STATE = 'state'  # `jit_sharded` marker: an argument (output) laid out by `state_shardings`


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> jax.sharding.Mesh:
  """('data', 'fsdp') mesh over the first `num_devices` devices (default: every device of every process), with
  data = num_devices // fsdp."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 0 < n <= len(devices):
    raise ValueError(f'config.num_devices={num_devices} but {len(devices)} devices are available.')
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'config.parallel.fsdp={fsdp} must divide the number of devices, {n} (config.num_devices, '
                     '0 = all): set config.parallel.fsdp to a divisor of it.')
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  """Leading (batch) axis split over both mesh axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def num_shards(mesh) -> int:
  """The number of batch shards: data * fsdp."""
  return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


# --------------------------------------------------------------------------------------------------- state layout


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """The rule table (module docstring): the PartitionSpec of an array of `shape` on an fsdp-way axis."""
  if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  divisible = [i for i, n in enumerate(shape) if n % fsdp == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda i: (shape[i], -i))  # largest, the first of equal ones
  return P(*(FSDP_AXIS if i == axis else None for i in range(len(shape))))


def shard_shape(shape: tuple[int, ...], fsdp: int) -> tuple[int, ...]:
  """The shape of one device's shard of an array of `shape` laid out by the rule table at `fsdp` ways."""
  spec = param_spec(shape, fsdp)
  return tuple(n // fsdp if i < len(spec) and spec[i] is not None else n for i, n in enumerate(shape))


def state_shardings(tree, mesh):
  """NamedShardings of a pytree of arrays or ShapeDtypeStructs (params, optimizer state, a TrainState) by the rule
  table; fsdp = 1: all replicated."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def shard_state(tree, mesh):
  """device_put by `state_shardings` (an array already laid out so is returned as is, not copied)."""
  return jax.device_put(tree, state_shardings(tree, mesh))


def gather(tree, mesh, skip=None):
  """Inside a jitted step: sharded parameters replicated on every device before use (FSDP's all-gather), so the
  forward and backward passes are those of data parallelism. `skip(path) -> bool`: leaves left as they are (the
  trunk's blocks under `gathers_per_layer`, which gather their own)."""
  if skip is None:
    return jax.lax.with_sharding_constraint(tree, replicated(mesh))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if skip(path) else jax.lax.with_sharding_constraint(x, replicated(mesh)), tree)


_LAYER_MESH = contextvars.ContextVar('layer_mesh', default=None)


@contextlib.contextmanager
def gathers_per_layer(mesh):
  """While a step is traced under it, the trunk's blocks gather their own parameters, one layer at a time
  (`model/blocks.py`); the step gathers the rest (`gather(..., skip=)`)."""
  token = _LAYER_MESH.set(mesh)
  try:
    yield
  finally:
    _LAYER_MESH.reset(token)


def layer_mesh():
  """The mesh of `gathers_per_layer` while a step is traced under it, else None."""
  return _LAYER_MESH.get()


def gather_layer(tree, mesh):
  """Inside a jitted step: each floating leaf all-gathered (replicated) in the forward pass, its cotangent laid out
  by the rule table (reduce-scattered) in the backward pass, leaf by leaf, so a frozen leaf gets no gradient."""
  return jax.tree.map(lambda x: _gather_leaf(mesh, x) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather_leaf(mesh, x):
  return gather(x, mesh)


def _gather_leaf_fwd(mesh, x):
  return gather(x, mesh), None


def _gather_leaf_bwd(mesh, _, ct):
  return (scatter(ct, mesh),)


_gather_leaf.defvjp(_gather_leaf_fwd, _gather_leaf_bwd)


def scatter(tree, mesh):
  """Inside a jitted step: gradients laid out by the rule table (summed over the batch shards and split: XLA's
  reduce-scatter), so the optimizer update runs on each device's shard only."""
  return jax.lax.with_sharding_constraint(tree, state_shardings(tree, mesh))


def spec_table(tree, mesh) -> str:
  """One line per array: 'path [shape] -> spec'."""
  fsdp = mesh.shape[FSDP_AXIS]
  return '\n'.join(f'{jax.tree_util.keystr(path)} {list(np.shape(x))} -> {param_spec(np.shape(x), fsdp)}'
                   for path, x in jax.tree_util.tree_leaves_with_path(tree))


def state_bytes(tree, mesh) -> tuple[int, int]:
  """(bytes per device, bytes replicated) of a pytree: placed arrays by their sharding, others by the rule table."""
  per_device = total = 0
  for x in jax.tree.leaves(tree):
    shape, itemsize = np.shape(x), np.dtype(x.dtype).itemsize
    shard = x.sharding.shard_shape(shape) if isinstance(x, jax.Array) else shard_shape(shape, mesh.shape[FSDP_AXIS])
    per_device += math.prod(shard) * itemsize
    total += math.prod(shape) * itemsize
  return per_device, total


def describe_memory(state, mesh) -> str:
  """The line logged at the start of a stage: per-device MiB of a TrainState's params + optimizer state, and the
  replicated figure."""
  (p_dev, p_all), (o_dev, o_all) = state_bytes(state.params, mesh), state_bytes(state.opt_state, mesh)
  mib = lambda b: f'{b / 2**20:.4g} MiB'
  return (f'Per device (data={mesh.shape[DATA_AXIS]}, fsdp={mesh.shape[FSDP_AXIS]}): params {mib(p_dev)} + '
          f'optimizer state {mib(o_dev)} = {mib(p_dev + o_dev)}; replicated {mib(p_all)} + {mib(o_all)} = '
          f'{mib(p_all + o_all)} ({(p_dev + o_dev) / max(p_all + o_all, 1):.2f}x).')


def jit_sharded(fn, mesh, in_shardings, out_shardings, donate_argnums=()):
  """jax.jit(fn) where the marker STATE in `in_shardings` stands for `state_shardings` of that argument (known at
  the call) and in `out_shardings` for those of the first STATE argument (a step returns its state laid out as it
  came). A None argument marked STATE (no reference model) is replicated. One jit per shapes of the STATE
  arguments."""
  compiled = {}

  def jitted(args):
    marked = [a for a, s in zip(args, in_shardings) if s is STATE]
    key = tuple((jax.tree.structure(a), tuple(np.shape(x) for x in jax.tree.leaves(a))) for a in marked)
    if key not in compiled:
      layout = lambda a: replicated(mesh) if a is None else state_shardings(a, mesh)
      ins = tuple(layout(a) if s is STATE else s for a, s in zip(args, in_shardings))
      first = layout(marked[0]) if marked else None
      outs = jax.tree.map(lambda s: first if s is STATE else s, out_shardings, is_leaf=lambda s: s is STATE)
      compiled[key] = jax.jit(fn, in_shardings=ins, out_shardings=outs, donate_argnums=donate_argnums)
    return compiled[key]

  call = lambda *args: jitted(args)(*args)
  call.lower = lambda *args: jitted(args).lower(*args)  # abstract arguments (ShapeDtypeStructs): dtt_jax/dry_run.py
  return call


# ---------------------------------------------------------------------------------------------------------- batches


def shard_batch(batch, mesh):
  """Host numpy batch (this process's rows, leading axis) -> global jax arrays sharded over ('data', 'fsdp').

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
  arrays sharded over ('data', 'fsdp') (each device takes its rows)."""
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
    raise ValueError(f'{what}={batch_size} must be divisible by the number of batch shards ({n} = '
                     f'data {mesh.shape[DATA_AXIS]} x fsdp {mesh.shape[FSDP_AXIS]}).')
