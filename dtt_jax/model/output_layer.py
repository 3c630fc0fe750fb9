"""The output layer in vocabulary tiles: cross-entropy, log-probs and argmax without the [M,V] logits.

Every stage scores hidden states against the output layer's table [V,D] (`output_table()`: GPT-2's tied `wte`; a
Llama / Qwen2 trunk's `wte` when tied, its `lm_head` when not); only its first `num_tokens` rows are real tokens
(the others are padding, which `logits` masks to NEG_INF). Rows are flattened positions: hidden [M,D], targets and
weights [M], with M = B*T.

Kernels (custom gradients, tested against the plain log-softmax in tests/test_output_layer.py):

  fused_cross_entropy(hidden, table, targets, weights, num_tokens, groups) -> (sum_m w_m * -log p(t_m), argmax [M])
      Stage 1 and COCONUT. The rows of nonzero weight are sorted first within each of `groups` contiguous row
      groups (one per device) and split into ROW_SPLITS blocks; only the blocks that hold such rows run (a
      `lax.switch`), the others cost nothing and get argmax -1. Each block scans the vocabulary tiles [C,D] with a
      running max, its first column (the first maximum, as jnp.argmax) and sum exp; the loss is linear in the
      per-row terms, so the gradient is computed in the same pass, from the stored float32 logit tiles of the rows
      that ran. Never materialised: the softmax, the one-hot targets or d_logits over the whole vocabulary (one
      [R,C] tile at a time), and any logit of a skipped block.
  fused_token_logprobs(hidden, table, targets, temperature, num_tokens) -> (log p(t_m) [M], entropy [M])
      GRPO, softmax(hidden @ table.T / temperature). Forward: the vocabulary tiles with an online log-sum-exp, one
      [M,C] tile at a time; backward: ROW_TILE rows at a time, each recomputing its [ROW_TILE, V] logits once.
      Never materialised: the [M,V] logits, neither forward nor backward. The entropy carries no gradient.

The tile width is `tile_width(V)`: a divisor of V near VOCAB_TILE, so the table reshapes into tiles without a copy.

Precision: the hidden states come in the model's compute dtype (bfloat16 or float32), the table in its parameter
dtype (float32 master weights). Every logit is the product of the hidden state and the table row both in the compute
dtype (`_compute`), accumulated in float32; the max, log-sum-exp, loss, log-probs, entropy and all gradient products
are float32; the gradients return in the dtypes of hidden and table.

Model-level entry points take the trunk (`GPT2` or `Llama`) and [B,T,D] hidden states; `fused=False` is the plain
[B,T,V] logits of its `logits`, the reference the kernels are tested against:
  cross_entropy(gpt2, hidden, targets, weights, fused, groups) -> (weighted NLL sum, argmax [B,T])
  plain_cross_entropy(gpt2, hidden, targets) -> (NLL [B,T], argmax [B,T]) from the plain logits
  token_logprobs(gpt2, hidden, tokens, temperature, fused) -> (log p [B,T], entropy [B,T]) over the real columns
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import optax

from dtt_jax.model.gpt2 import GPT2, NEG_INF

# Tile sizes (measured on CPU with the full vocabulary: the [rows, tile] logits of a forward tile stay in cache; a
# backward tile's [rows, V] block is streamed once).
VOCAB_TILE = 1024
ROW_TILE = 512
# The fused cross-entropy splits each row group into this many blocks, rows of nonzero weight sorted first, and runs
# only the blocks that hold such rows (padding and fillers carry no loss).
ROW_SPLITS = 4


def tile_width(v: int) -> int:
  """Columns per vocabulary tile: the divisor of v nearest VOCAB_TILE within a factor 2 of it (the table reshapes
  into tiles without a padded copy: 1048 for GPT-2's 50304 rows), else VOCAB_TILE (the last tile padded)."""
  if v <= VOCAB_TILE:
    return v
  divisors = [c for c in range(VOCAB_TILE // 2, 2 * VOCAB_TILE + 1) if v % c == 0]
  return min(divisors, key=lambda c: abs(c - VOCAB_TILE)) if divisors else VOCAB_TILE


def vocab_tiles(table: jax.Array, num_tokens: int):
  """table [V,D] -> tiles [n, C, D] (zero-padded when C does not divide V), valid [n, C] (column < num_tokens)."""
  v, d = table.shape
  tile = tile_width(v)
  n = -(-v // tile)
  tiles = table if n * tile == v else jnp.pad(table, ((0, n * tile - v), (0, 0)))
  return tiles.reshape(n, tile, d), (jnp.arange(n * tile) < num_tokens).reshape(n, tile)


def _compute(rows, dtype):
  """Table rows [..., D] -> float32 values of the rows rounded to the compute `dtype` (what each logit multiplies)."""
  return rows.astype(dtype).astype(jnp.float32)


def _scaled_logits(hidden, table, temperature, valid):
  """hidden [M,D], table [C,D] -> logits / temperature [M,C] float32, NEG_INF where not `valid` [C]."""
  logits = jnp.dot(hidden, table.astype(hidden.dtype).T, preferred_element_type=jnp.float32) / temperature
  return jnp.where(valid, logits, NEG_INF)


# ------------------------------------------------------------------------------------------------ cross-entropy


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
    x = _scaled_logits(hidden, tile, 1.0, tile_valid)  # [R,C]
    tile_top = jnp.max(x, axis=-1)
    new_top = jnp.maximum(top, tile_top)
    first = jnp.min(jnp.where(x == tile_top[:, None], jnp.arange(width, dtype=jnp.int32), width), axis=-1)
    arg = jnp.where(tile_top > top, j * width + first, arg)  # the first maximum, as jnp.argmax
    sum_e = sum_e * jnp.exp(top - new_top) + jnp.sum(jnp.exp(x - new_top[:, None]), -1)
    return (new_top, arg, sum_e), (x if with_grad else None)

  init = (jnp.full((m,), -jnp.inf, jnp.float32), jnp.zeros((m,), jnp.int32), jnp.zeros((m,), jnp.float32))
  (top, arg, sum_e), logits = jax.lax.scan(tile_step, init, (tiles, valid, jnp.arange(n, dtype=jnp.int32)))
  lse = top + jnp.log(sum_e)
  target_logits = jnp.sum(h * _compute(tiles.reshape(n * width, -1)[targets], hidden.dtype), -1)
  total = jnp.sum(weights * (lse - target_logits))
  if not with_grad:
    return total, arg, None, None

  def grad_step(d_hidden, xs):
    x, tile, j = xs
    onehot = targets[:, None] == j * width + jnp.arange(width)[None]
    d_logits = weights[:, None] * (jnp.exp(x - lse[:, None]) - onehot)  # [R,C]
    return d_hidden + jnp.dot(d_logits, _compute(tile, hidden.dtype)), jnp.dot(d_logits.T, h)  # [R,D], [C,D]

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
  tiles, valid = vocab_tiles(table, num_tokens)

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
  """The output layer, cross-entropy and argmax in vocabulary tiles, never materialising the [M,V] logits:
  hidden [M,D], table [V,D], targets [M], weights [M] -> (sum_m weights_m * -log p(targets_m), argmax [M] int32) of
  softmax(hidden @ table.T) over the first `num_tokens` columns (`GPT2.logits` masks the others to NEG_INF).

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


# ---------------------------------------------------------------------------------------------------- log-probs


def _fused_forward(hidden, table, targets, temperature, num_tokens):
  """One pass over vocabulary tiles with a running max: log-normaliser, entropy and target log-probs [M]."""
  m = hidden.shape[0]
  tiles, valid = vocab_tiles(table, num_tokens)

  def tile_step(carry, xs):
    top, sum_e, sum_ex = carry  # [M] running max, sum exp(x - top), sum exp(x - top) * x
    tile, tile_valid = xs
    x = _scaled_logits(hidden, tile, temperature, tile_valid)  # [M, C]
    new_top = jnp.maximum(top, jnp.max(x, axis=-1))
    rescale = jnp.exp(top - new_top)
    e = jnp.exp(x - new_top[:, None])
    return (new_top, sum_e * rescale + jnp.sum(e, -1), sum_ex * rescale + jnp.sum(e * x, -1)), None

  init = (jnp.full((m,), NEG_INF, jnp.float32), jnp.zeros((m,), jnp.float32), jnp.zeros((m,), jnp.float32))
  (top, sum_e, sum_ex), _ = jax.lax.scan(tile_step, init, (tiles, valid))
  lse = top + jnp.log(sum_e)
  entropy = lse - sum_ex / sum_e
  target_logits = jnp.sum(hidden.astype(jnp.float32) * _compute(table[targets], hidden.dtype), -1) / temperature
  return (target_logits - lse, entropy), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_token_logprobs(hidden, table, targets, temperature: float, num_tokens: int):
  """The output layer fused with its log-softmax: never materialises the [M, V] logits.

  hidden [M,D], table [V,D] (`output_table()`), targets [M] -> (log p(targets) [M], entropy [M]) of
  softmax(hidden @ table.T / temperature) over the first `num_tokens` columns. The entropy carries no gradient.
  Forward: vocabulary tiles with an online log-sum-exp. Backward: row tiles, each recomputing its logits once:
  d logits = g * (onehot - softmax) / temperature.
  """
  return _fused_forward(hidden, table, targets, temperature, num_tokens)[0]


def _fused_fwd(hidden, table, targets, temperature, num_tokens):
  out, lse = _fused_forward(hidden, table, targets, temperature, num_tokens)
  return out, (hidden, table, targets, lse)


def _fused_bwd(temperature, num_tokens, residuals, cotangents):
  hidden, table, targets, lse = residuals
  g = cotangents[0].astype(jnp.float32) / temperature  # d loss / d logit(target), per row
  m, d = hidden.shape
  rows = min(ROW_TILE, m)
  n = -(-m // rows)
  pad = n * rows - m
  # Tile j holds rows j, j + n, j + 2n, ...: with rows sharded over devices, every tile stays spread over all.
  split = lambda x: jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(rows, n, *x.shape[1:]).swapaxes(0, 1)
  valid = jnp.arange(table.shape[0]) < num_tokens
  table_values = _compute(table, hidden.dtype)  # [V,D] float32 (the table itself when both are float32)

  def tile_step(d_table, xs):
    h, lse_t, g_t = xs
    softmax = jnp.exp(_scaled_logits(h, table, temperature, valid) - lse_t[:, None])  # [rows, V]
    d_logits = -g_t[:, None] * softmax
    d_table = d_table + jnp.dot(d_logits.T, h.astype(jnp.float32))
    return d_table, jnp.dot(d_logits, table_values)

  d_table, d_hidden = jax.lax.scan(tile_step, jnp.zeros(table.shape, jnp.float32),
                                   (split(hidden), split(lse), split(g)))
  d_hidden = (d_hidden.swapaxes(0, 1).reshape(n * rows, d)[:m]
              + g[:, None] * table_values[targets])
  d_table = d_table.at[targets].add(g[:, None] * hidden.astype(jnp.float32))
  return d_hidden.astype(hidden.dtype), d_table.astype(table.dtype), None


fused_token_logprobs.defvjp(_fused_fwd, _fused_bwd)


# ---------------------------------------------------------------------------------------- model-level entry points


def plain_cross_entropy(gpt2: GPT2, hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """hidden [B,T,D], targets [B,T] -> (-log p(targets) [B,T], argmax [B,T]) of the plain logits of
  `gpt2.logits` ([B,T,V(+K)]: thinking columns included when the model has them)."""
  logits = gpt2.logits(hidden)  # [B,T,V]
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets), jnp.argmax(logits, -1)


def cross_entropy(gpt2: GPT2, hidden: jax.Array, targets: jax.Array, weights: jax.Array, fused: bool = True,
                  groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """hidden [B,T,D], targets, weights [B,T] -> (sum of weights * -log p(targets), argmax of the logits [B,T]).

  `fused` (and no thinking columns): `fused_cross_entropy`, whose argmax is -1 in skipped rows of weight 0 and whose
  `groups` are the contiguous row groups (devices); otherwise `plain_cross_entropy`."""
  if fused and not gpt2.cfg.extra_tokens:
    b, t, d = hidden.shape
    total, prediction = fused_cross_entropy(hidden.reshape(b * t, d), gpt2.output_table(), targets.reshape(b * t),
                                            weights.reshape(b * t).astype(jnp.float32), gpt2.cfg.num_tokens, groups)
    return total, prediction.reshape(b, t)
  nll, prediction = plain_cross_entropy(gpt2, hidden, targets)
  return jnp.sum(nll * weights), prediction


def token_logprobs(gpt2: GPT2, hidden: jax.Array, tokens: jax.Array, temperature: float = 1.0,
                   fused: bool = True) -> tuple[jax.Array, jax.Array]:
  """hidden [N,T,D], tokens [N,T] (real ids) -> (log p(tokens) [N,T], entropy [N,T]) of softmax(logits /
  temperature) over the real token columns (thinking columns, if any, excluded).

  The entropy carries no gradient. `fused`: `fused_token_logprobs`; otherwise the plain [N,T,V] logits of
  `gpt2.logits` (the reference the fused path is tested against).
  """
  n, t, d = hidden.shape
  chex.assert_shape([tokens], (n, t))
  if fused:
    logp, entropy = fused_token_logprobs(hidden.reshape(n * t, d), gpt2.output_table(), tokens.reshape(n * t),
                                         float(temperature), gpt2.cfg.num_tokens)
    return logp.reshape(n, t), entropy.reshape(n, t)
  logits = gpt2.logits(hidden)[..., :gpt2.cfg.vocab_rows] / temperature  # [N,T,V] float32
  log_softmax = jax.nn.log_softmax(logits)
  logp = jnp.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0]
  probs = jax.lax.stop_gradient(jnp.exp(log_softmax))
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jax.lax.stop_gradient(log_softmax), 0.0), axis=-1)
  return logp, entropy
