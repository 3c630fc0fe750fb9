"""`fast_unroll.unroll` (hand-written backward of the teacher-forced recurrence) equals `engine.unroll` and its
autodiff gradient; the fused Stage-1 loss equals the unfused one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2Config
from dtt_jax.sampling import engine
from dtt_jax.train import bootstrap, fast_unroll

TINY = GPT2Config(vocab_rows=128, num_tokens=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
B, P, T = 4, 6, 9


def _model(gate='dtt', projection=False):
  model = DTTModel(DTTConfig(TINY, gate_bias_init=0.0, gate=gate, use_projection=projection), rngs=nnx.Rngs(0))
  if gate == 'dtt':
    model.gate_head.kernel.value = 0.5 * jax.random.normal(jax.random.key(1), (32, 1))
  if projection:
    model.proj.kernel.value = model.proj.kernel.value + 0.1 * jax.random.normal(jax.random.key(7), (32, 32))
  return model


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  prompt = rng.randint(5, 100, (B, P)).astype(np.int32)
  mask = np.ones((B, P), np.int32)
  for i, n in enumerate([P, 2, 4, 5]):  # left padding
    mask[i, :P - n] = 0
    prompt[i, :P - n] = 0
  completion = rng.randint(0, 100, (B, T)).astype(np.int32)
  noise = rng.logistic(size=(B, T)).astype(np.float32)
  key_bias = np.where(rng.rand(B, T) < 0.3, np.log(0.3), 0.0).astype(np.float32)
  forced = (rng.rand(B, T) < 0.5).astype(np.float32)
  return tuple(map(jnp.asarray, (prompt, mask, completion, noise, key_bias, forced)))


def _loss(unroll_fn, graphdef, params, inputs, use_bias, use_forced, hard=False, segment=64):
  prompt, mask, completion, noise, key_bias, forced = inputs
  model = nnx.merge(graphdef, params)
  out = unroll_fn(model, prompt, mask, completion, noise, 0.7, hard=hard,
                  completion_key_bias=key_bias if use_bias else None, forced_gates=forced if use_forced else None,
                  segment=segment)
  logits = model.gpt2.logits(out.target_hidden)
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, completion))
  gate_term = jnp.mean(jax.nn.relu(0.9 - out.gates) * jnp.arange(T)) + jnp.mean(out.gates ** 2)
  return ce + gate_term + 0.1 * jnp.sum(jnp.sin(out.last_hidden)), out


def _assert_tree_close(a, b, rtol=1e-5):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.abs(y).max(), 1e-12)
    np.testing.assert_allclose(x, y, atol=rtol * scale, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('use_bias,use_forced,hard,segment,projection', [
    (True, False, False, 64, False),  # gate on (random gate head), left-padded prompts, noisy-span bias
    (True, True, False, 64, False),  # forced gates
    (False, False, True, 4, True),  # hard gate, projection, three cache segments
    (True, False, False, 4, False),
])
def test_outputs_and_gradients_equal_autodiff(use_bias, use_forced, hard, segment, projection):
  graphdef, params = nnx.split(_model(projection=projection))
  inputs = _inputs()
  results = {}
  for name, fn in (('fast', fast_unroll.unroll), ('engine', engine.unroll)):
    loss = lambda p, fn=fn: _loss(fn, graphdef, p, inputs, use_bias, use_forced, hard, segment)
    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    results[name] = (value, out, grads)
  (v_fast, out_fast, g_fast), (v_ref, out_ref, g_ref) = results['fast'], results['engine']
  _assert_tree_close(out_fast, out_ref)
  np.testing.assert_allclose(float(v_fast), float(v_ref), rtol=1e-6)
  _assert_tree_close(g_fast, g_ref)
  # The gate really carries gradient (a random gate head), and the gradient reaches the token embeddings.
  if not use_forced:
    assert float(jnp.abs(g_fast['gate_head']['kernel'].value).max()) > 1e-4
  assert float(jnp.abs(g_fast['gpt2']['wte']['embedding'].value).max()) > 1e-4


def test_hrpo_gate_falls_back_to_engine():
  graphdef, params = nnx.split(_model(gate='hrpo'))
  inputs = _inputs(1)
  g_fast = jax.grad(lambda p: _loss(fast_unroll.unroll, graphdef, p, inputs, True, False)[0])(params)
  g_ref = jax.grad(lambda p: _loss(engine.unroll, graphdef, p, inputs, True, False)[0])(params)
  _assert_tree_close(g_fast, g_ref)


def _batch(seed=0):
  """A Stage-1 batch: left-padded prompts, completions with fillers (inner), loss positions, padding."""
  prompt, mask, completion, _, _, _ = _inputs(seed)
  rng = np.random.RandomState(seed + 1)
  completion_mask = np.ones((B, T), np.int32)
  completion_mask[1, 6:] = 0
  inner = np.zeros((B, T), np.int32)
  inner[::2, 1:4] = 1
  batch = dict(prompt=prompt, prompt_mask=mask, completion=completion, completion_mask=jnp.asarray(completion_mask),
               inner_mask=jnp.asarray(inner), filler_mask=jnp.asarray(inner * (rng.rand(B, T) < 0.7)),
               outer_mask=jnp.asarray(completion_mask - inner), loss_mask=jnp.asarray(completion_mask - inner))
  return batch


@pytest.mark.parametrize('fast_unroll_on,fused', [(True, True), (False, True), (True, False)])
def test_stage1_loss_and_gradients_equal_the_plain_path(fast_unroll_on, fused):
  """loss_terms with the fast recurrence and/or the fused output layer equals the autodiff, unfused one: loss,
  metrics (token_accuracy included) and gradients of every parameter."""
  graphdef, params = nnx.split(_model())
  batch = _batch()
  noise = jnp.asarray(np.random.RandomState(3).logistic(size=(B, T)).astype(np.float32))
  # Targets at position 0 of rows 0-2 = the model's prediction there (from h_{-1}, which only the prompt decides),
  # so token_accuracy is neither 0 nor 1.
  model = nnx.merge(graphdef, params)
  out = engine.unroll(model, batch['prompt'], batch['prompt_mask'], batch['completion'], noise, 0.7)
  first = jnp.argmax(model.gpt2.logits(out.target_hidden[:, 0]), -1)
  batch['completion'] = batch['completion'].at[:3, 0].set(first[:3])
  counts = bootstrap._counts(batch)  # pylint: disable=protected-access

  def run(cfg):
    f = lambda p: bootstrap.loss_terms(nnx.merge(graphdef, p), batch, noise, 0.7, cfg, counts)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (loss, metrics), grads = run(bootstrap.LossConfig(hinge_lambda=0.5, fast_unroll=fast_unroll_on, fused_output=fused))
  (loss_ref, metrics_ref), grads_ref = run(bootstrap.LossConfig(hinge_lambda=0.5, fast_unroll=False,
                                                                fused_output=False))
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
  for name in metrics_ref:
    np.testing.assert_allclose(float(metrics[name]), float(metrics_ref[name]), rtol=1e-5, err_msg=name)
  assert 0 < float(metrics_ref['token_accuracy']) < 1
  _assert_tree_close(grads, grads_ref)


@pytest.mark.parametrize('splits,groups', [(1, 1), (4, 1), (4, 2)])
def test_fused_cross_entropy_equals_logits(monkeypatch, splits, groups):
  """fused_cross_entropy's weighted loss, gradients and argmax equal those of model.gpt2.logits (padded rows >=
  num_tokens masked), with several vocabulary tiles and ties resolved to the first maximum like jnp.argmax. Split
  into row blocks, the blocks holding only weight-0 rows are skipped (argmax -1 there), per row group."""
  monkeypatch.setattr(bootstrap, 'ROW_SPLITS', splits)
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
    return bootstrap.fused_cross_entropy(h, t, targets, weights, 2250, groups)

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
