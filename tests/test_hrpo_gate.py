"""HRPO gate (`config.model.gate='hrpo'`): the formula in float64 NumPy, the initial range of a, the normalised soft
embedding, generation = a naive loop, re-scoring = generation (engine and GRPO), and the switch from configs."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dtt_jax import parallel, pipeline, tokens
from dtt_jax.model import build_model
from dtt_jax.model.dtt import DTTConfig, DTTModel, HRPOGate, normalized_soft_embedding
from dtt_jax.model.gpt2 import GPT2Config
from dtt_jax.rl import grpo, rollout
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.train import bootstrap, state as state_lib
from tests.test_engine import naive_scores

EOS, BOT, EOT = 0, 1, 2
TINY = GPT2Config(vocab_rows=128, num_tokens=100, n_positions=64, n_embd=32, n_layer=2, n_head=4)
C = 8.0


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def numpy_gate(params, e, z, c=C):
  """HRPO's formula in float64: (a*e + sqrt(1-a^2)*(i*z), mean_D sqrt(1-a^2))."""
  f = lambda x: np.asarray(x, np.float64)
  r = _sigmoid(f(e) @ f(params['gate_r']['kernel']) + f(params['gate_r']['bias']))
  i = _sigmoid(f(e) @ f(params['gate_i']['kernel']) + f(params['gate_i']['bias']))
  a = _sigmoid(f(params['lam'])) ** (c * r)
  w = np.sqrt(1 - a ** 2)
  return a * f(e) + w * (i * f(z)), w.mean(-1)


def numpy_soft_embedding(logits, table, tau):
  """E^T p / ||p||_2, p = softmax(logits / tau), float64."""
  x = np.asarray(logits, np.float64) / tau
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p @ np.asarray(table, np.float64) / np.linalg.norm(p, axis=-1, keepdims=True)


def _perturb(module: nnx.Module, seed: int, scale: float = 0.5) -> None:
  """Random gate parameters (W_r, W_i, biases, lam moved off their init) so every term is exercised."""
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Param):
      var.value = var.value + scale * jax.random.normal(next(keys), var.value.shape)


def _model(seed: int = 0, perturb: bool = True) -> DTTModel:
  model = DTTModel(DTTConfig(TINY, gate='hrpo'), rngs=nnx.Rngs(seed))
  if perturb:
    _perturb(model.hrpo, seed + 1)
    model.hrpo.lam.value = model.hrpo.lam.value - 4.0  # a well inside (0, 1): the latent part is large
  return model


def test_gate_equals_numpy_formula():
  gate = HRPOGate(6, C, (0.99, 0.999), rngs=nnx.Rngs(0))
  _perturb(gate, 1)
  gate.lam.value = gate.lam.value - 5.0
  e, z = jax.random.normal(jax.random.key(2), (2, 3, 6)), jax.random.normal(jax.random.key(3), (2, 3, 6))
  x, g = gate(e, z)
  ref_x, ref_g = numpy_gate(nnx.to_pure_dict(nnx.state(gate)), e, z)
  assert x.shape == (2, 3, 6) and g.shape == (2, 3)
  np.testing.assert_allclose(x, ref_x, atol=1e-5)
  np.testing.assert_allclose(g, ref_g, atol=1e-6)
  assert 0.2 < float(g.min()) and float(g.max()) < 1.0


def test_initial_a_runs_over_the_init_range_for_every_input():
  """W_r = W_i = 0 at init: r = i = 1/2 for any embedding, a = linspace(0.99, 0.999, D), gate = mean sqrt(1-a^2)."""
  gate = HRPOGate(32, C, (0.99, 0.999), rngs=nnx.Rngs(0))
  e = 10.0 * jax.random.normal(jax.random.key(1), (5, 32))
  a, w, i = gate.coefficients(e)
  expected_a = np.linspace(0.99, 0.999, 32)
  np.testing.assert_allclose(a, np.broadcast_to(expected_a, (5, 32)), atol=2e-7)
  assert float(a.min()) >= 0.99 - 1e-6 and float(a.max()) <= 0.999 + 1e-6
  np.testing.assert_allclose(i, 0.5)
  _, g = gate(e, jnp.ones_like(e))
  np.testing.assert_allclose(g, np.full(5, np.sqrt(1 - expected_a ** 2).mean()), rtol=1e-5)


def test_soft_embedding_exact_values():
  table = jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [2.0, 0.0, 1.0], [4.0, 4.0, 4.0]])
  one_hot = jnp.array([[0.0, -1e9, -1e9, -1e9]])  # p = e_0: exactly row 0
  np.testing.assert_allclose(normalized_soft_embedding(one_hot, table, 1.0), table[:1], atol=1e-6)
  uniform = jnp.zeros((1, 4))  # p = 1/4, ||p|| = 1/2: sum of rows / 2
  np.testing.assert_allclose(normalized_soft_embedding(uniform, table, 1.0), [[3.5, 3.5, 4.0]], atol=1e-6)
  logits = jax.random.normal(jax.random.key(0), (2, 3, 4))
  tau = jnp.array([[0.5], [2.0]])  # [N,1] per row, as GRPO re-scoring passes it
  np.testing.assert_allclose(normalized_soft_embedding(logits, table, tau),
                             numpy_soft_embedding(logits, table, np.asarray(tau)[..., None]), atol=1e-5)


def test_blended_input_equals_numpy_reference():
  """blended_input: logits of h_{t-1} with the tied output layer (padding rows excluded), soft embedding at tau,
  token embedding e of y_t, HRPO blend; the gate noise is ignored."""
  model = _model()
  hidden = jax.random.normal(jax.random.key(4), (2, 3, 32))
  tok = jnp.array([[5, 6, 7], [8, 9, 99]])
  tau = jnp.array([[0.7], [1.3]])
  x, g = model.blended_input(hidden, tok, 5.0 * jnp.ones((2, 3)), tau)
  table = np.asarray(model.gpt2.wte.embedding.value)
  logits = np.asarray(hidden, np.float64) @ table[:TINY.num_tokens].T
  z = numpy_soft_embedding(logits, table[:TINY.num_tokens], np.asarray(tau)[..., None])
  ref_x, ref_g = numpy_gate(nnx.to_pure_dict(nnx.state(model.hrpo)), table[np.asarray(tok)], z)
  np.testing.assert_allclose(x, ref_x, atol=1e-4)
  np.testing.assert_allclose(g, ref_g, atol=1e-6)
  x0, g0 = model.blended_input(hidden, tok, jnp.zeros((2, 3)), tau)
  np.testing.assert_array_equal(x, x0)
  np.testing.assert_array_equal(g, g0)
  np.testing.assert_array_equal(model.gate_logit(hidden), np.zeros((2, 3)))


def _prompts():
  prompt = jnp.array([[EOS, EOS, EOS, 15, 16, 17], [20, 21, 22, 23, 24, 25]], jnp.int32)
  mask = jnp.array([[0, 0, 0, 1, 1, 1], [1] * 6], jnp.int32)
  return prompt, mask


def test_generation_equals_naive_loop_and_rescore_reproduces_it():
  model = _model()
  prompt, mask = _prompts()
  cfg = engine.GenerateConfig(max_new_tokens=8, eos_id=EOS, bot_id=BOT, eot_id=EOT, segment=4, gate_noise=True,
                              sampling=SamplingConfig(temperature=1.5))
  out = engine.generate(model, prompt, mask, jax.random.key(3), 0.8, cfg, return_logits=True)
  ref_logits, ref_gates = naive_scores(model, prompt, mask, out.tokens, out.gate_noise, 0.8)  # noise unused
  np.testing.assert_allclose(out.logits, ref_logits, atol=1e-4)
  np.testing.assert_allclose(out.gates, ref_gates, atol=1e-5)
  assert float(out.gates.min()) > 0.2  # the latent part really enters the inputs
  hidden, gates = engine.rescore(model, prompt, mask, out.tokens, out.hidden_inputs, out.gate_noise, 0.8)
  np.testing.assert_allclose(model.gpt2.logits(hidden), out.logits, atol=1e-4)
  np.testing.assert_allclose(gates, out.gates, atol=1e-5)


def test_grpo_rescores_hrpo_rollouts_to_their_logprobs_and_trains_the_gate():
  """A real rollout (2 prompts x 4, temperature 0.8, reference pass) and GRPO steps: the first step's re-scored log-probs
  and gates equal the rollout's, and the HRPO gate parameters move."""
  vocab = tokens.Vocab.compact([range(1000, 1095)])
  cfg = grpo.GRPOConfig(num_generations=4, beta=0.1, temperature=0.8, max_new_tokens=8, max_think=3)
  model = DTTModel(DTTConfig(dataclasses.replace(TINY, vocab_rows=vocab.num_rows, num_tokens=vocab.num_tokens),
                             gate='hrpo'), rngs=nnx.Rngs(0))
  _perturb(model.hrpo, 1)
  model.hrpo.lam.value = model.hrpo.lam.value - 4.0
  graphdef, params = state_lib.split_model(model)
  params = jax.device_get(params)  # host copy: the step donates its state
  mesh = parallel.make_mesh(1)
  prompt, mask = rollout.repeat_prompts(*map(np.asarray, _prompts()), 4)
  out, ref_logprobs = rollout.make_rollout_fn(graphdef, cfg, vocab, mesh)(params, params, prompt, mask,
                                                                          jax.random.key(0), jnp.float32(0.7))
  out, ref_logprobs = jax.device_get((out, ref_logprobs))
  n, t = out.tokens.shape
  inner = np.zeros((n, t), np.float32)
  rewards = np.random.RandomState(0).randn(n).astype(np.float32)
  batch = rollout.RolloutBatch(
      prompt=prompt, prompt_mask=mask, completion=out.tokens, completion_mask=out.mask, forced=out.forced,
      logprobs=out.logprobs, ref_logprobs=ref_logprobs, gates=out.gates, gate_noise=out.gate_noise,
      hidden_inputs=out.hidden_inputs, inner_mask=inner, outer_mask=out.mask.astype(np.float32),
      tau=np.full((n,), 0.7, np.float32), rewards=rewards, stats={'accuracy': (rewards > 0).astype(np.float32)})
  tx = state_lib.make_optimizer(1e-2, 10, 0, 0.0, 1.0)
  state = parallel.replicate(state_lib.init_state(params, tx, seed=0), mesh)
  step = grpo.make_grpo_step(graphdef, tx, cfg, mesh)
  new, metrics = step(state, rollout.shard_rollout(batch, mesh, 4))
  metrics = jax.device_get(metrics)
  new, _ = step(new, rollout.shard_rollout(batch, mesh, 4))  # the warmup's first learning rate is 0
  assert metrics['logprob_mismatch_max'] < 1e-4 and metrics['gate_mismatch'] < 1e-5
  for name in ('gate_r', 'gate_i'):
    assert np.abs(np.asarray(new.params['hrpo'][name]['kernel']) - params['hrpo'][name]['kernel']).max() > 0
  assert np.abs(np.asarray(new.params['hrpo']['lam']) - params['hrpo']['lam']).max() > 0


def test_bootstrap_hinge_reaches_the_hrpo_gate():
  """The Stage-1 loss (CE + gate hinge through the recurrent blend) gives gradient to W_r, W_i and lam."""
  model = _model(perturb=False)
  graphdef, params = nnx.split(model)
  batch = {'prompt': jnp.array([[0, 5, 6, 7]] * 2), 'prompt_mask': jnp.array([[0, 1, 1, 1]] * 2),
           'completion': jnp.array([[BOT, 8, 9, EOT, 10, EOS]] * 2), 'completion_mask': jnp.ones((2, 6), jnp.int32),
           'inner_mask': jnp.array([[0, 1, 1, 0, 0, 0]] * 2), 'filler_mask': jnp.zeros((2, 6), jnp.int32)}
  batch['outer_mask'] = batch['completion_mask'] - batch['inner_mask']
  batch['loss_mask'] = batch['completion_mask']
  cfg = bootstrap.LossConfig(hinge_lambda=1.0, gate_noise=False)
  counts = {k: jnp.sum(batch[k]).astype(jnp.float32) for k in ('loss_mask', 'inner_mask', 'outer_mask')}

  def loss(p):
    return bootstrap.loss_terms(nnx.merge(graphdef, p), batch, jnp.zeros((2, 6)), 1.0, cfg, counts)[0]

  grads = jax.jit(jax.grad(loss))(params)['hrpo']
  for leaf in (grads['gate_r']['kernel'], grads['gate_i']['kernel'], grads['lam']):
    assert float(jnp.abs(leaf.value).max()) > 0


def test_switch_from_configs():
  vocab = tokens.Vocab.compact([range(1000, 1095)])
  hrpo_cfg = importlib.import_module('configs.hrpo').get_config()
  pipeline.check_config(hrpo_cfg)
  model = build_model(hrpo_cfg.model, vocab)
  assert model.gate_head is None and isinstance(model.hrpo, HRPOGate) and model.hrpo.c == 8.0
  base = build_model(importlib.import_module('configs.quickstart').get_config().model, vocab)
  assert base.hrpo is None and base.gate_head is not None
  hrpo_cfg.grpo.gate_as_action = True
  with pytest.raises(ValueError, match='config.grpo.gate_as_action=True does not apply to config.model.gate="hrpo"'):
    pipeline.check_config(hrpo_cfg)
  hrpo_cfg.grpo.gate_as_action = False
  hrpo_cfg.model.gate = 'gru'
  with pytest.raises(ValueError, match="config.model.gate='gru': expected one of 'dtt', 'hrpo'"):
    pipeline.check_config(hrpo_cfg)
  with pytest.raises(ValueError, match=r'config.model.hrpo_a_init=\(0.99, 1.0\)'):
    DTTConfig(TINY, gate='hrpo', hrpo_a_init=(0.99, 1.0))
