"""Gradients inside the train steps (bootstrap, COCONUT, GRPO): of the trained parameters only, through FSDP
gathers, accumulated over microbatches.

* Trained parameters (`trained_filter`): with LoRA adapters in the tree, the frozen base ('base' of
  `state.param_labels`) is an input of the loss, never differentiated: no gradient buffers, no weight-gradient
  products for it (the optimizer zeroes those updates anyway, so the update is the same). `grad` returns None at
  frozen leaves; `fill_frozen` puts zeros there for the optimizer (which ignores them: `set_to_zero`), and
  `apply_updates` passes the frozen leaves through untouched.
* Gathers (`parallel`): the whole model before the loss (`per_layer=False`: a recurrence that reuses every weight
  at every position), or all but the trunk's blocks, each block gathering its own as it runs (`per_layer=True`,
  with remat on: `model/blocks.py`). Gradients are laid out by the rule table (reduce-scattered).
  `vocab_parallel=True` leaves the [V,D] vocabulary tables ungathered: split over 'fsdp' by rows, and XLA partitions
  what reads them (embedding lookups, logits, softmax, the HRPO gate's soft embedding, their gradients) over the
  vocabulary, as tensor parallelism's output layer: the same numbers (up to the order of float32 sums), without the
  whole table and its gradient on every device. The bootstrap's recurrence takes it (its HRPO gate reads the table
  at every position and its reverse scan carries the table's gradient: 1.5B at fsdp 4, 21.6 -> 16.8 GiB of
  temporaries); GRPO's parallel pass does not (there XLA's partitioning of the [N,T,V] logits costs more: 12.1 ->
  17.9 GiB; docs/scaling.md).
* Microbatches (`split_microbatches`, `accumulate`): microbatch m takes rows m, m + n, ... of the batch (each
  device's rows stay spread evenly), and a `lax.scan` sums what each returns; a loss normalised by whole-batch
  counts then sums to the whole batch's gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dtt_jax import parallel
from dtt_jax.model.blocks import is_block_param
from dtt_jax.train import state as state_lib

VOCAB_TABLES = ('wte', 'lm_head')  # the trunk's [V,D] tables


def is_vocab_table(path) -> bool:
  """Whether a key path of a DTT model's params is a [V,D] vocabulary table (`gpt2.wte`, an untied `gpt2.lm_head`):
  left sharded with `vocab_parallel` (module docstring)."""
  keys = [getattr(p, 'key', None) for p in path]
  return len(keys) > 1 and keys[0] == 'gpt2' and keys[1] in VOCAB_TABLES


def trained_filter(train_modules: tuple[str, ...] = ()):
  """-> `trained(params) -> bool tree`: False at the frozen base of a LoRA tree (`config.lora.train_modules` train
  besides adapters and gate), True everywhere in a tree without adapters."""
  return lambda params: jax.tree.map(lambda label: label != 'base', state_lib.param_labels(params, train_modules))


def split_trained(params, trained=None):
  """-> (trained leaves, frozen leaves): two trees of `params`' structure with None in place of the other part's
  leaves. `trained`: a `trained_filter` (None: every leaf trains)."""
  if trained is None:
    return params, jax.tree.map(lambda _: None, params)
  mask = trained(params)
  return (jax.tree.map(lambda x, t: x if t else None, params, mask),
          jax.tree.map(lambda x, t: None if t else x, params, mask))


def combine(first, second):
  """The leaves of `first`, and those of `second` where `first` has None (trees of the same structure)."""
  return jax.tree.map(lambda a, b: b if a is None else a, first, second, is_leaf=lambda x: x is None)


def fill_frozen(grads, params):
  """Gradients with None at frozen leaves -> zeros there (the optimizer's tree)."""
  return combine(grads, jax.tree.map(jnp.zeros_like, params))


def apply_updates(params, updates, trained=None):
  """`optax.apply_updates` on the trained leaves; the frozen ones come back as they are (their update is zero:
  nothing to add, no new buffer)."""
  train, frozen = split_trained(params, trained)
  return combine(optax.apply_updates(train, split_trained(updates, trained)[0]), frozen)


def grad(loss_fn, params, mesh, trained=None, per_layer: bool = False, vocab_parallel: bool = False):
  """-> (gradient laid out by the rule table, None at frozen leaves; aux) of `loss_fn(gathered params) -> (loss,
  aux)` with respect to the trained leaves of `params` (module docstring)."""
  train, frozen = split_trained(params, trained)
  per_layer = per_layer and mesh.shape[parallel.FSDP_AXIS] > 1
  skip = lambda path: (vocab_parallel and is_vocab_table(path)) or (per_layer and is_block_param(path))

  def loss(t):
    full = parallel.gather(combine(t, frozen), mesh, skip=skip)
    if not per_layer:
      return loss_fn(full)
    with parallel.gathers_per_layer(mesh):
      return loss_fn(full)

  grads, aux = jax.grad(loss, has_aux=True)(train)
  return parallel.scatter(grads, mesh), aux


def split_microbatches(tree, n: int):
  """Leaves [B,...] -> [n, B/n, ...], microbatch m taking rows m, m + n, ... (each device's rows spread evenly)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), tree)


def merge_microbatches(tree):
  """The inverse of `split_microbatches`: leaves [n, B/n, ...] -> [B, ...]."""
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def accumulate(fn, micro, n: int, mesh):
  """`fn(microbatch, m) -> (summed, stacked)` over the n microbatches of `micro` (leaves [n, ...]) in a `lax.scan`
  -> (the sum over m of `summed`, `stacked` of every m, leaves [n, ...]); n = 1 calls fn once, without a loop. The
  sums are laid out by the rule table on `mesh` (the gradients' layout: a sharded accumulator, not a full one)."""
  if n == 1:
    summed, stacked = fn(jax.tree.map(lambda x: x[0], micro), jnp.int32(0))
    return summed, jax.tree.map(lambda x: x[None], stacked)
  shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro), jnp.int32(0))[0]
  zeros = parallel.scatter(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), mesh)

  def body(acc, xs):
    summed, stacked = fn(*xs)
    return jax.tree.map(jnp.add, acc, summed), stacked

  return jax.lax.scan(body, zeros, (micro, jnp.arange(n)))
