"""`fast_unroll.unroll` (hand-written backward of the teacher-forced recurrence) equals `engine.unroll` and its
autodiff gradient; the fused Stage-1 loss equals the unfused one (the output layer alone: test_output_layer.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import Dropout, GPT2Config
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


def _loss(unroll_fn, graphdef, params, inputs, use_bias, use_forced, hard=False, segment=64, dropout=0.0):
  prompt, mask, completion, noise, key_bias, forced = inputs
  model = nnx.merge(graphdef, params)
  out = unroll_fn(model, prompt, mask, completion, noise, 0.7, hard=hard,
                  completion_key_bias=key_bias if use_bias else None, forced_gates=forced if use_forced else None,
                  segment=segment, dropout=Dropout(jax.random.key(5), dropout, P + T) if dropout else None)
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


@pytest.mark.parametrize('use_bias,use_forced,hard,segment,projection,dropout', [
    (True, False, False, 64, False, 0.0),  # gate on (random gate head), left-padded prompts, noisy-span bias
    (True, True, False, 64, False, 0.0),  # forced gates
    (False, False, True, 4, True, 0.0),  # hard gate, projection, three cache segments
    (True, False, False, 4, False, 0.3),  # dropout: the backward pass draws the forward's masks
])
def test_outputs_and_gradients_equal_autodiff(use_bias, use_forced, hard, segment, projection, dropout):
  graphdef, params = nnx.split(_model(projection=projection))
  inputs = _inputs()
  results = {}
  for name, fn in (('fast', fast_unroll.unroll), ('engine', engine.unroll)):
    loss = lambda p, fn=fn: _loss(fn, graphdef, p, inputs, use_bias, use_forced, hard, segment, dropout)
    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    results[name] = (value, out, grads)
  (v_fast, out_fast, g_fast), (v_ref, out_ref, g_ref) = results['fast'], results['engine']
  _assert_tree_close(out_fast, out_ref)
  np.testing.assert_allclose(float(v_fast), float(v_ref), rtol=1e-6)
  _assert_tree_close(g_fast, g_ref)
  if dropout:  # the masks change the function: not the dropout-free outputs
    clean = jax.jit(lambda p: _loss(engine.unroll, graphdef, p, inputs, use_bias, use_forced, hard, segment)[0])
    assert abs(float(clean(params)) - float(v_ref)) > 1e-3
  # The gate really carries gradient (a random gate head), and the gradient reaches the token embeddings.
  if not use_forced:
    assert float(jnp.abs(g_fast['gate_head']['kernel'].value).max()) > 1e-4
  assert float(jnp.abs(g_fast['gpt2']['wte']['embedding'].value).max()) > 1e-4


def test_hrpo_gate_and_a_frozen_part_equal_autodiff():
  """The HRPO gate (which reads the whole table every step) through the hand-written backward, differentiating only
  some parameters (the rest closed over, as a LoRA step's frozen base, which `symbolic_zeros` leaves out of the
  backward pass): autodiff's gradients."""
  model = _model(gate='hrpo')
  model.hrpo.gate_r.kernel.value = 0.3 * jax.random.normal(jax.random.key(2), (32, 32))  # a input-dependent
  graphdef, params = nnx.split(model)
  inputs = _inputs(1)
  train = {'gpt2': {'wte': params['gpt2']['wte'], 'h': {0: params['gpt2']['h'][0]}}, 'hrpo': params['hrpo']}
  grads = {name: jax.jit(jax.grad(lambda t, fn=fn: _loss(fn, graphdef, nnx.State.merge(params, t), inputs, True,
                                                          False)[0]))(train)
           for name, fn in (('fast', fast_unroll.unroll), ('engine', engine.unroll))}
  _assert_tree_close(grads['fast'], grads['engine'])
  assert float(jnp.abs(grads['fast']['hrpo']['gate_r']['kernel'].value).max()) > 1e-4
  assert float(jnp.abs(grads['fast']['gpt2']['wte']['embedding'].value).max()) > 1e-4
  assert float(jnp.abs(grads['fast']['gpt2']['h'][0]['mlp']['c_fc']['kernel'].value).max()) > 1e-4


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
