"""The tiled output layer (`model/output_layer.py`) equals the plain log-softmax of `GPT2.logits`: the fused
cross-entropy's loss, gradients and argmax, the fused log-probs' values, entropy and gradients; the vocabulary tiles
cover the table exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dtt_jax.model import output_layer
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2, GPT2Config
from dtt_jax.train import state as state_lib

TINY = GPT2Config(vocab_rows=128, num_tokens=100, n_positions=64, n_embd=32, n_layer=2, n_head=4)


def _assert_tree_close(a, b, rtol=1e-5):
  """Every leaf of `a` within rtol * max|leaf of b| of `b`'s."""
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.abs(y).max(), 1e-12)
    np.testing.assert_allclose(x, y, atol=rtol * scale, rtol=0, err_msg=jax.tree_util.keystr(path))


def _assert_trees_close(a, b, atol, rtol=0.0):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


def test_vocabulary_tiles_divide_the_table_when_they_can():
  assert output_layer.tile_width(50304) == 1048  # GPT-2's padded table: 48 tiles, no padded copy
  assert output_layer.tile_width(512) == 512  # a compact vocabulary: one tile
  assert output_layer.tile_width(50261) == output_layer.VOCAB_TILE  # a prime: tiles of VOCAB_TILE, the last padded
  table = jnp.arange(50261 * 2, dtype=jnp.float32).reshape(50261, 2)
  tiles, valid = output_layer.vocab_tiles(table, 50000)
  assert tiles.shape == (50, 1024, 2) and valid.shape == (50, 1024)
  np.testing.assert_array_equal(tiles.reshape(-1, 2)[:50261], table)
  assert float(jnp.abs(tiles.reshape(-1, 2)[50261:]).max()) == 0.0
  assert int(valid.sum()) == 50000 and bool(valid.reshape(-1)[49999]) and not bool(valid.reshape(-1)[50000])


@pytest.mark.parametrize('tile_width,row_tile', [(32, 8), (48, 8), (1024, 512)])
def test_fused_output_layer_equals_log_softmax(monkeypatch, tile_width, row_tile):
  """The tiled output layer (several vocabulary tiles that divide the 128 rows, or whose last one is padded; row
  tiles that do not divide the rows) gives the log-softmax log-probs and entropy of the plain logits, and the same
  gradients (hidden states and the tied embedding), with padded vocabulary rows excluded."""
  monkeypatch.setattr(output_layer, 'tile_width', lambda v: min(tile_width, v))
  monkeypatch.setattr(output_layer, 'ROW_TILE', row_tile)
  graphdef, params = state_lib.split_model(GPT2(TINY, rngs=nnx.Rngs(0)))
  hidden = jax.random.normal(jax.random.key(0), (3, 7, TINY.n_embd))
  targets = jax.random.randint(jax.random.key(1), (3, 7), 0, TINY.num_tokens)
  weights = jax.random.normal(jax.random.key(2), (3, 7))

  def objective(p, h, fused):
    logp, entropy = output_layer.token_logprobs(nnx.merge(graphdef, p), h, targets, 0.8, fused)
    return jnp.sum(weights * logp), (logp, entropy)

  outputs = {}
  for fused in (True, False):
    grad_fn = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True), static_argnums=2)
    outputs[fused] = grad_fn(params, hidden, fused)
  (grads, (logp, entropy)), (ref_grads, (ref_logp, ref_entropy)) = outputs[True], outputs[False]
  np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
  np.testing.assert_allclose(entropy, ref_entropy, atol=1e-4)
  assert float(ref_entropy.min()) > 1.0  # a spread distribution: the entropy check means something
  _assert_trees_close(grads, ref_grads, atol=1e-5)
  assert float(jnp.abs(grads[0]['wte']['embedding']).max()) > 1e-3


def test_token_logprobs_exclude_thinking_columns():
  """With K thinking columns, both paths score the real token columns only: the plain path is exactly the
  log-softmax of `GPT2.logits`' first vocab_rows columns (what thinking tokens' teacher reward and LM stage use),
  the fused one equals it."""
  model = GPT2(dataclasses.replace(TINY, extra_tokens=3), rngs=nnx.Rngs(0))
  model.think_bias.value = jnp.full((3,), 4.0)  # thinking columns that would take most of the mass
  hidden = jax.random.normal(jax.random.key(0), (2, 5, TINY.n_embd))
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, TINY.num_tokens)
  want = jnp.take_along_axis(jax.nn.log_softmax(model.logits(hidden)[..., :TINY.vocab_rows]), targets[..., None],
                             -1)[..., 0]
  plain, _ = output_layer.token_logprobs(model, hidden, targets, fused=False)
  fused, _ = output_layer.token_logprobs(model, hidden, targets, fused=True)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(want))
  np.testing.assert_allclose(np.asarray(fused), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize('splits,groups', [(1, 1), (4, 1), (4, 2)])
def test_fused_cross_entropy_equals_logits(monkeypatch, splits, groups):
  """fused_cross_entropy's weighted loss, gradients and argmax equal those of model.gpt2.logits (padded rows >=
  num_tokens masked), with several vocabulary tiles and ties resolved to the first maximum like jnp.argmax. Split
  into row blocks, the blocks holding only weight-0 rows are skipped (argmax -1 there), per row group."""
  monkeypatch.setattr(output_layer, 'ROW_SPLITS', splits)
  cfg = GPT2Config(vocab_rows=2304, num_tokens=2250, n_positions=8, n_embd=16, n_layer=1, n_head=2)
  model = DTTModel(DTTConfig(cfg), rngs=nnx.Rngs(0))
  table = model.gpt2.wte.embedding.value
  table = table.at[2260].set(50.0).at[1500].set(table[1400])  # a padded row that would win; a tied pair
  model.gpt2.wte.embedding.value = table
  hidden = jax.random.normal(jax.random.key(0), (40, 16))
  hidden = hidden.at[1].set(table[1400] * 30.0)  # row 1's maximum: the tie 1400 / 1500
  targets = jax.random.randint(jax.random.key(1), (40,), 0, 2250)
  # Weight 0 at every third row and in the second half but row 38: 13 + 1 weighted rows. One group of 40 rows in 4
  # blocks runs 2 (20 rows); two groups of 20 rows in blocks of 5 both run the 3 blocks the first one needs.
  keep = (jnp.arange(40) % 3 > 0) & ((jnp.arange(40) < 20) | (jnp.arange(40) >= 38))
  weights = jax.random.uniform(jax.random.key(2), (40,)) * keep

  def fused(h, t):
    return output_layer.fused_cross_entropy(h, t, targets, weights, 2250, groups)

  def plain(h, t):
    logits = model.gpt2.logits(h) if t is None else jnp.where(jnp.arange(2304) < 2250, h @ t.T, -1e9)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], -1)[:, 0]
    return jnp.sum(weights * nll), jnp.argmax(logits, -1)

  (total, argmax), grads = jax.value_and_grad(fused, (0, 1), has_aux=True)(hidden, table)
  (total_ref, argmax_ref), grads_ref = jax.value_and_grad(plain, (0, 1), has_aux=True)(hidden, table)
  np.testing.assert_allclose(float(total), float(total_ref), rtol=1e-5)
  argmax, argmax_ref, keep = np.asarray(argmax), np.asarray(argmax_ref), np.asarray(keep)
  np.testing.assert_array_equal(argmax[keep], argmax_ref[keep])
  np.testing.assert_array_equal(argmax_ref, np.asarray(jnp.argmax(model.gpt2.logits(hidden), -1)))
  assert int(argmax[1]) == 1400
  computed = argmax != -1  # rows in blocks that ran: their argmax is exact too
  np.testing.assert_array_equal(argmax[computed], argmax_ref[computed])
  assert computed.sum() == (40 if splits == 1 else {1: 20, 2: 30}[groups]), computed.sum()
  _assert_tree_close(grads, grads_ref)
  np.testing.assert_allclose(float(jax.jit(fused)(hidden, table)[0]), float(total_ref), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(jax.jit(fused)(hidden, table)[1]), argmax)
