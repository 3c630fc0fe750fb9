"""Stage 1, the supervised bootstrap (SPEC §5): cross-entropy + gate hinge through the exact recurrent blend.

    loss = CE(completion targets, fillers excluded) + lambda * (mean_inner relu(m_in - g) + mean_outer relu(g - m_out))

The completion is teacher-forced through the generation engine's step (`engine.unroll`), so the gate blends the
previous hidden state into every completion input exactly as at generation time. Attention to injected filler
keys is scaled by `noisy_span_scale` (log of it added to their attention logits).

Two exact speed-ups, both on by default (`LossConfig`): `fast_unroll` (the recurrence's hand-written backward pass,
`train/fast_unroll.py`; same values and gradients as autodiff through `engine.unroll`) and `fused_output` (the output
layer, cross-entropy and argmax in vocabulary tiles, `fused_cross_entropy`: no [B,T,V] logits).

The step is one pure jitted function `(state, batch, tau) -> (state, metrics)`: the state is donated, the batch is
sharded over the ('data',) mesh, parameters are replicated. Gradient accumulation over `microbatches` keeps the
effective batch constant on any device count: every microbatch's loss is normalised by the whole batch's counts,
so the summed gradient equals the full-batch gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dtt_jax import parallel
from dtt_jax.model.dtt import DTTModel, logistic_noise
from dtt_jax.data.samples import BATCH_FIELDS
from dtt_jax.rl import grpo
from dtt_jax.sampling import engine
from dtt_jax.train import fast_unroll
from dtt_jax.train.state import TrainState, step_key


@dataclasses.dataclass(frozen=True)
class LossConfig:
  hinge_lambda: float = 0.1
  m_in: float = 0.9
  m_out: float = 0.1
  noisy_span_scale: float = 0.3
  gate_noise: bool = True
  hard_gate: bool = False
  fast_unroll: bool = True  # the recurrence's hand-written backward (`fast_unroll.unroll`); False: autodiff of it
  fused_output: bool = True  # output layer + cross-entropy in vocabulary tiles (`fused_cross_entropy`)
  row_groups: int = 1  # rows of the fused output layer sorted per group: the number of devices (`make_train_step`)

  @classmethod
  def from_config(cls, c) -> LossConfig:
    """The fields `c` holds (the others keep their defaults)."""
    return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c})


COUNTED = ('loss_mask', 'inner_mask', 'outer_mask')


def _counts(batch) -> dict[str, jax.Array]:
  """Whole-batch normalisers of the mask fields present (at least 1)."""
  return {name: jnp.maximum(jnp.sum(batch[name]), 1).astype(jnp.float32) for name in COUNTED if name in batch}


def noisy_span_bias(filler_mask, scale: float) -> jax.Array:
  """filler_mask [B,T] -> additive attention bias of those keys: log(scale) on fillers, 0 elsewhere."""
  return jnp.where(filler_mask > 0, math.log(scale), 0.0)


# The fused output layer splits each row group into this many blocks, rows of nonzero weight sorted first, and runs
# only the blocks that hold such rows (padding and fillers carry no loss).
ROW_SPLITS = 4


def _ce_block(hidden, tiles, valid, targets, weights, with_grad: bool):
  """One block of rows through the output layer: hidden [R,D], vocabulary tiles [n,C,D] with valid [n,C] ->
  (sum of weights * -log p(targets), argmax [R], d_hidden [R,D], d_tiles [n,C,D]; the last two None without grad).

  Forward: a scan over the tiles with a running max, its first column and sum exp -> log-normaliser and argmax.
  The loss is linear in the per-row terms, so its gradient is computed here too, from the stored logit tiles:
  three matmuls in all, every elementwise op on one cache-sized tile."""
  m = hidden.shape[0]
  n, width, _ = tiles.shape
  h = hidden.astype(jnp.float32)

  def tile_step(carry, xs):
    top, arg, sum_e = carry  # [R] running max, its column, sum exp(x - top)
    tile, tile_valid, j = xs
    x = grpo._scaled_logits(hidden, tile, 1.0, tile_valid)  # [R,C] pylint: disable=protected-access
    tile_top = jnp.max(x, axis=-1)
    new_top = jnp.maximum(top, tile_top)
    first = jnp.min(jnp.where(x == tile_top[:, None], jnp.arange(width, dtype=jnp.int32), width), axis=-1)
    arg = jnp.where(tile_top > top, j * width + first, arg)  # the first maximum, as jnp.argmax
    sum_e = sum_e * jnp.exp(top - new_top) + jnp.sum(jnp.exp(x - new_top[:, None]), -1)
    return (new_top, arg, sum_e), (x if with_grad else None)

  init = (jnp.full((m,), -jnp.inf, jnp.float32), jnp.zeros((m,), jnp.int32), jnp.zeros((m,), jnp.float32))
  (top, arg, sum_e), logits = jax.lax.scan(tile_step, init, (tiles, valid, jnp.arange(n, dtype=jnp.int32)))
  lse = top + jnp.log(sum_e)
  target_logits = jnp.sum(h * tiles.reshape(n * width, -1)[targets].astype(jnp.float32), -1)
  total = jnp.sum(weights * (lse - target_logits))
  if not with_grad:
    return total, arg, None, None

  def grad_step(d_hidden, xs):
    x, tile, j = xs
    onehot = targets[:, None] == j * width + jnp.arange(width)[None]
    d_logits = weights[:, None] * (jnp.exp(x - lse[:, None]) - onehot)  # [R,C]
    return d_hidden + jnp.dot(d_logits, tile.astype(jnp.float32)), jnp.dot(d_logits.T, h)  # [R,D], [C,D]

  d_hidden, d_tiles = jax.lax.scan(grad_step, jnp.zeros(h.shape, jnp.float32),
                                   (logits, tiles, jnp.arange(n, dtype=jnp.int32)))
  return total, arg, d_hidden, d_tiles


def _fused_ce(hidden, table, targets, weights, num_tokens: int, groups: int, with_grad: bool):
  """`fused_cross_entropy` -> (total, argmax [M], d_hidden [M,D], d_table [V,D]; the last two None without grad).

  The M rows are `groups` contiguous groups (one per device when the rows are sharded, so every gather below stays
  on its device). Within each group the rows of nonzero weight go first (a stable sort), and only the first k of
  ROW_SPLITS blocks of every group, as many as the fullest group needs, go through `_ce_block` (`lax.switch` over
  k, one static shape each). The rows left out have weight 0, so loss and gradient are exact; their argmax is -1."""
  m, d = hidden.shape
  if m % groups:
    raise ValueError(f'{m} rows cannot be split into {groups} groups.')
  per = m // groups
  block = -(-per // ROW_SPLITS)
  padded = block * ROW_SPLITS
  active = (weights != 0).reshape(groups, per)
  order = jnp.argsort(~active, axis=1, stable=True)  # [G, per]
  needed = (jnp.max(jnp.sum(active, axis=1)) + block - 1) // block

  def arrange(x):  # [M, ...] -> [G, padded, ...]: each group's rows in `order`, zero rows after them
    x = x.reshape(groups, per, *x.shape[1:])
    x = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    return jnp.pad(x, ((0, 0), (0, padded - per)) + ((0, 0),) * (x.ndim - 2))

  rows = tuple(arrange(x) for x in (hidden, targets, weights.astype(jnp.float32)))
  tiles, valid = grpo._vocab_tiles(table, num_tokens)  # pylint: disable=protected-access

  def first_blocks(k, rows):  # the first k blocks of every group -> outputs padded back to [G, padded, ...]
    h, t, w = (x[:, :k * block].reshape(groups * k * block, *x.shape[2:]) for x in rows)
    total, arg, d_h, d_tiles = _ce_block(h, tiles, valid, t, w, with_grad)
    back = lambda x, fill: jnp.pad(x.reshape(groups, k * block, *x.shape[1:]),
                                   ((0, 0), (0, padded - k * block)) + ((0, 0),) * (x.ndim - 1), constant_values=fill)
    return total, back(arg, -1), None if d_h is None else back(d_h, 0.0), d_tiles

  branches = [functools.partial(first_blocks, k) for k in range(1, ROW_SPLITS + 1)]
  total, arg, d_hidden, d_tiles = jax.lax.switch(jnp.clip(needed, 1, ROW_SPLITS) - 1, branches, rows)
  inverse = jnp.argsort(order, axis=1)  # [G, per]: sorted position of each original row
  unsort = lambda x: jnp.take_along_axis(x[:, :per], inverse.reshape(inverse.shape + (1,) * (x.ndim - 2)), axis=1)
  arg = unsort(arg).reshape(m)
  if not with_grad:
    return total, arg, None, None
  return (total, arg, unsort(d_hidden).reshape(m, d).astype(hidden.dtype),
          d_tiles.reshape(-1, d)[:table.shape[0]].astype(table.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_cross_entropy(hidden, table, targets, weights, num_tokens: int, groups: int = 1):
  """The tied output layer, cross-entropy and argmax in vocabulary tiles, never materialising the [M,V] logits:
  hidden [M,D], table [V,D], targets [M], weights [M] -> (sum_m weights_m * -log p(targets_m), argmax [M] int32) of
  softmax(hidden @ table.T) over the first `num_tokens` columns (`model.gpt2.logits` masks the others to NEG_INF).

  Rows of weight 0 cost nothing when a whole block of them can be skipped; their argmax is then -1 (`_fused_ce`;
  `groups`: the number of contiguous row groups, one per device, sorted separately). The loss is linear in the
  per-row terms, so the differentiated call computes the gradient in the same pass (`weights` and `targets` get no
  gradient)."""
  return _fused_ce(hidden, table, targets, weights, num_tokens, groups, with_grad=False)[:2]


def _fused_ce_fwd(hidden, table, targets, weights, num_tokens, groups):
  total, arg, d_hidden, d_table = _fused_ce(hidden, table, targets, weights, num_tokens, groups, with_grad=True)
  return (total, arg), (d_hidden, d_table)


def _fused_ce_bwd(num_tokens, groups, residuals, cotangents):
  del num_tokens, groups
  d_hidden, d_table = residuals
  g = cotangents[0]
  return g.astype(d_hidden.dtype) * d_hidden, g.astype(d_table.dtype) * d_table, None, None


fused_cross_entropy.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def _weighted_nll_and_prediction(model: DTTModel, target_hidden, targets, weights, fused: bool, groups: int = 1):
  """target_hidden [B,T,D], targets, weights [B,T] -> (sum of weights * -log p(targets), argmax of the logits
  [B,T], which the fused path may leave at -1 where the weight is 0); `groups`: `fused_cross_entropy`'s."""
  if fused and not model.gpt2.cfg.extra_tokens:
    b, t, d = target_hidden.shape
    total, prediction = fused_cross_entropy(target_hidden.reshape(b * t, d), model.gpt2.wte.embedding[...],
                                            targets.reshape(b * t), weights.reshape(b * t).astype(jnp.float32),
                                            model.gpt2.cfg.num_tokens, groups)
    return total, prediction.reshape(b, t)
  logits = model.gpt2.logits(target_hidden)  # [B,T,V]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * weights), jnp.argmax(logits, -1)


def loss_terms(model: DTTModel, batch, noise, tau, cfg: LossConfig, counts):
  """Sums of the loss terms over `batch` divided by the (whole-batch) `counts` -> (loss, metrics).

  batch fields [B,P] / [B,T] as in `BATCH_FIELDS`; noise [B,T] logistic gate noise.
  """
  chex.assert_equal_shape([batch['completion'], batch['loss_mask'], noise])
  unroll = fast_unroll.unroll if cfg.fast_unroll else engine.unroll
  out = unroll(model, batch['prompt'], batch['prompt_mask'], batch['completion'], noise, tau,
               hard=cfg.hard_gate, completion_key_bias=noisy_span_bias(batch['filler_mask'], cfg.noisy_span_scale))
  ce, prediction = _weighted_nll_and_prediction(model, out.target_hidden, batch['completion'],
                                                batch['loss_mask'] / counts['loss_mask'], cfg.fused_output,
                                                cfg.row_groups)
  gates = out.gates
  hinge_in = jnp.sum(jax.nn.relu(cfg.m_in - gates) * batch['inner_mask']) / counts['inner_mask']
  hinge_out = jnp.sum(jax.nn.relu(gates - cfg.m_out) * batch['outer_mask']) / counts['outer_mask']
  loss = ce + cfg.hinge_lambda * (hinge_in + hinge_out)
  correct = (prediction == batch['completion']) * batch['loss_mask']
  metrics = {
      'loss': loss, 'ce': ce, 'hinge': hinge_in + hinge_out,
      'gate_inner': jnp.sum(gates * batch['inner_mask']) / counts['inner_mask'],
      'gate_outer': jnp.sum(gates * batch['outer_mask']) / counts['outer_mask'],
      'token_accuracy': jnp.sum(correct) / counts['loss_mask'],
  }
  return loss, metrics


def _split_microbatches(batch, n: int):
  """[B,...] -> [n, B/n, ...] with microbatch m taking rows m, m+n, ... (each device's rows stay spread evenly)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: LossConfig, mesh, microbatches: int = 1):
  """-> jitted `train_step(state, batch, tau) -> (state, metrics)` of the Stage-1 loss (`make_step`)."""
  cfg = dataclasses.replace(cfg, row_groups=parallel.num_shards(mesh))

  def loss_fn(model, batch, key, tau, counts):
    shape = batch['completion'].shape
    noise = logistic_noise(key, shape) if cfg.gate_noise else jnp.zeros(shape, jnp.float32)
    return loss_terms(model, batch, noise, tau, cfg, counts)

  return make_step(graphdef, tx, loss_fn, BATCH_FIELDS, mesh, microbatches)


def make_step(graphdef, tx: optax.GradientTransformation, loss_fn, fields, mesh, microbatches: int = 1):
  """-> jitted `train_step(state, batch, tau) -> (state, metrics)` (state donated, batch sharded on 'data').

  `loss_fn(model, batch, key, tau, counts) -> (loss, metrics)` sums its terms over `batch` and divides by the
  whole-batch `counts` (`_counts`), so microbatch gradients add up to the full-batch gradient; `fields`: the batch
  entries the step takes."""

  def grads_and_metrics(params, batch, key, tau, counts):
    return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch, key, tau, counts), has_aux=True)(params)

  def train_step(state: TrainState, batch, tau):
    batch = {k: batch[k] for k in fields}
    counts = _counts(batch)
    key = step_key(state)
    if microbatches == 1:
      grads, metrics = grads_and_metrics(state.params, batch, key, tau, counts)
    else:
      micro = _split_microbatches(batch, microbatches)

      def accumulate(acc, xs):
        mb, m = xs
        out = grads_and_metrics(state.params, mb, jax.random.fold_in(key, m), tau, counts)
        return jax.tree.map(jnp.add, acc, out), None

      shapes = jax.eval_shape(grads_and_metrics, state.params, jax.tree.map(lambda x: x[0], micro), key, tau, counts)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(microbatches)))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), tau=jnp.asarray(tau, jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharded, replicated), out_shardings=(replicated, replicated),
                 donate_argnums=0)
