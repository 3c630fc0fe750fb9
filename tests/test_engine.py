"""The generation engine is exactly a naive full-recompute loop: cache, masks, positions, gates and re-scoring."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2Config, causal_bias, positions_from_mask
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig

EOS, BOT, EOT = 0, 1, 2
TINY = GPT2Config(vocab_rows=128, num_tokens=100, n_positions=64, n_embd=32, n_layer=2, n_head=4)


def _model(gate_on: bool, seed: int = 0) -> DTTModel:
  """gate_on: gate head with random weights and bias 0 (gates spread over (0,1)); off: bias -30 (gate = 0)."""
  model = DTTModel(DTTConfig(TINY, gate_bias_init=0.0 if gate_on else -30.0, use_projection=gate_on),
                   rngs=nnx.Rngs(seed))
  if gate_on:
    model.gate_head.kernel.value = 0.5 * jax.random.normal(jax.random.key(seed + 1), (32, 1))
  return model


def _prompts():
  """Two left-padded prompts: the first with 3 padding positions."""
  prompt = jnp.array([[EOS, EOS, EOS, 15, 16, 17], [20, 21, 22, 23, 24, 25]], jnp.int32)
  mask = jnp.array([[0, 0, 0, 1, 1, 1], [1] * 6], jnp.int32)
  return prompt, mask


def _gen_cfg(**kw):
  base = dict(max_new_tokens=10, eos_id=EOS, bot_id=BOT, eot_id=EOT, segment=4)
  base.update(kw)
  return engine.GenerateConfig(**base)


def naive_scores(model, prompt, mask, completion, noise, tau):
  """Reference without a cache: recompute the whole sequence at every step; returns logits [B,T,V], gates [B,T].
  Traced as one program: op-by-op dispatch would compile every op at every length (a minute on CPU)."""
  return _naive_scores(*nnx.split(model), prompt, mask, completion, noise, tau)


@functools.partial(jax.jit, static_argnums=0)
def _naive_scores(graphdef, state, prompt, mask, completion, noise, tau):
  model = nnx.merge(graphdef, state)
  x = model.gpt2.embed(prompt)
  h, _ = model.gpt2(x, positions_from_mask(mask), causal_bias(mask))
  last, logits, gates = h[:, -1], [], []
  for t in range(completion.shape[1]):
    logits.append(model.gpt2.logits(last))
    x_t, g = model.blended_input(last, completion[:, t], noise[:, t], tau)
    gates.append(g)
    x = jnp.concatenate([x, x_t[:, None]], axis=1)
    mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=1)
    h, _ = model.gpt2(x, positions_from_mask(mask), causal_bias(mask))
    last = h[:, -1]
  return jnp.stack(logits, 1), jnp.stack(gates, 1)


@pytest.mark.parametrize('gate_on', [True, False])
def test_greedy_generation_equals_naive_loop(gate_on):
  model = _model(gate_on)
  prompt, mask = _prompts()
  out = engine.generate(model, prompt, mask, jax.random.key(0), 0.7, _gen_cfg(sampling=SamplingConfig(greedy=True)),
                        return_logits=True)
  ref_logits, ref_gates = naive_scores(model, prompt, mask, out.tokens, out.gate_noise, 0.7)
  np.testing.assert_array_equal(out.tokens, jnp.argmax(ref_logits, -1))
  np.testing.assert_allclose(out.logits, ref_logits, atol=1e-4)
  np.testing.assert_allclose(out.gates, ref_gates, atol=1e-5)
  if gate_on:
    assert float(out.gates.min()) < 0.3 and float(out.gates.max()) > 0.7  # the latent path is really exercised


def test_sampled_generation_with_gate_noise_equals_naive_loop():
  model = _model(True)
  prompt, mask = _prompts()
  cfg = _gen_cfg(gate_noise=True, sampling=SamplingConfig(temperature=1.5))
  out = engine.generate(model, prompt, mask, jax.random.key(3), 1.0, cfg, return_logits=True)
  assert float(jnp.abs(out.gate_noise).min()) > 0
  ref_logits, ref_gates = naive_scores(model, prompt, mask, out.tokens, out.gate_noise, 1.0)
  np.testing.assert_allclose(out.logits, ref_logits, atol=1e-4)
  np.testing.assert_allclose(out.gates, ref_gates, atol=1e-5)
  ref_logp = jnp.take_along_axis(jax.nn.log_softmax(ref_logits / 1.5), out.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.logprobs, ref_logp * out.mask, atol=1e-4)


def test_unroll_and_rescore_reproduce_generation():
  model = _model(True)
  prompt, mask = _prompts()
  out = engine.generate(model, prompt, mask, jax.random.key(5), 0.5,
                        _gen_cfg(gate_noise=True, sampling=SamplingConfig(temperature=2.0)), return_logits=True)
  unrolled = engine.unroll(model, prompt, mask, out.tokens, out.gate_noise, 0.5, segment=3)
  np.testing.assert_allclose(model.gpt2.logits(unrolled.target_hidden), out.logits, atol=1e-4)
  np.testing.assert_allclose(unrolled.gates, out.gates, atol=1e-5)
  hidden, gates = engine.rescore(model, prompt, mask, out.tokens, out.hidden_inputs, out.gate_noise, 0.5)
  np.testing.assert_allclose(model.gpt2.logits(hidden), out.logits, atol=1e-4)
  np.testing.assert_allclose(gates, out.gates, atol=1e-5)


def test_left_padded_batch_equals_rows_alone():
  model = _model(True)
  prompt, mask = _prompts()
  cfg = _gen_cfg(sampling=SamplingConfig(greedy=True), early_stop=False)
  batch = engine.generate(model, prompt, mask, jax.random.key(0), 1.0, cfg, return_logits=True)
  for row, pad in ((0, 3), (1, 0)):
    alone = engine.generate(model, prompt[row:row + 1, pad:], mask[row:row + 1, pad:], jax.random.key(0), 1.0, cfg,
                            return_logits=True)
    np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
    np.testing.assert_allclose(batch.logits[row], alone.logits[0], atol=1e-4)


def test_unroll_is_differentiable():
  model = _model(True)
  prompt, mask = _prompts()
  completion = jnp.array([[BOT, 30, 31, EOT, 40, EOS]] * 2)
  graphdef, params = nnx.split(model)

  def loss(params):
    m = nnx.merge(graphdef, params)
    out = engine.unroll(m, prompt, mask, completion, jnp.zeros(completion.shape), 1.0)
    logp = jax.nn.log_softmax(m.gpt2.logits(out.target_hidden))
    return -jnp.mean(jnp.take_along_axis(logp, completion[..., None], -1)) + jnp.mean(out.gates)

  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(grads['gate_head']['kernel'].value).sum()) > 0
  assert float(jnp.abs(grads['gpt2']['h'][0]['attn']['c_attn']['kernel'].value).sum()) > 0


def _always_predicts(token: int, gate_bias: float = -30.0) -> DTTModel:
  """A model whose every hidden state is a scaled copy of one token's embedding, so argmax is always `token`."""
  model = _model(False)
  model.gate_head.bias.value = jnp.full((1,), gate_bias)
  model.gpt2.ln_f.scale.value = jnp.zeros_like(model.gpt2.ln_f.scale.value)
  model.gpt2.ln_f.bias.value = 50.0 * model.gpt2.wte.embedding.value[token]
  return model


def test_reasoning_budget_forces_eot():
  model = _always_predicts(BOT)
  prompt, mask = _prompts()
  out = engine.generate(model, prompt, mask, jax.random.key(0), 1.0,
                        _gen_cfg(max_think=3, sampling=SamplingConfig(greedy=True)))
  # <|bot|>, 3 span tokens (bot again: no second opening), then <|eot|> is forced; after it, free generation.
  expected = [BOT, BOT, BOT, BOT, EOT] + [BOT] * 5
  np.testing.assert_array_equal(out.tokens, [expected] * 2)
  np.testing.assert_array_equal(out.forced, [[0, 0, 0, 0, 1, 0, 0, 0, 0, 0]] * 2)


def test_per_row_budgets_force_eot_at_each_rows_own_position():
  """`think_budget` [B] overrides max_think row by row, 0 closing the span right after <|bot|> (GRPO's drawn
  budgets, the evaluation's forced budget)."""
  model = _always_predicts(BOT)
  prompt, mask = _prompts()
  out = engine.generate(model, prompt, mask, jax.random.key(0), 1.0,
                        _gen_cfg(max_think=3, sampling=SamplingConfig(greedy=True)),
                        think_budget=jnp.array([0, 5], jnp.int32))
  np.testing.assert_array_equal(out.tokens, [[BOT, EOT] + [BOT] * 8, [BOT] * 6 + [EOT] + [BOT] * 3])
  np.testing.assert_array_equal(out.forced[:, :7], [[0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]])


@pytest.mark.parametrize('early_stop', [True, False])
def test_rows_stop_at_eos(early_stop):
  model = _always_predicts(EOS)
  prompt, mask = _prompts()
  out = engine.generate(model, prompt, mask, jax.random.key(0), 1.0,
                        _gen_cfg(early_stop=early_stop, sampling=SamplingConfig(greedy=True)))
  np.testing.assert_array_equal(out.tokens, jnp.full((2, 10), EOS))
  np.testing.assert_array_equal(out.mask, [[1] + [0] * 9] * 2)
  assert float(jnp.abs(out.logprobs[:, 1:]).max()) == 0.0


def test_hidden_state_reaches_next_input():
  """With the gate open (g ~ 1) the next step's output depends on the previous hidden state; closed, it doesn't."""
  prompt, mask = _prompts()
  outs = {}
  for name, bias in (('open', 30.0), ('closed', -30.0)):
    model = _model(False)
    model.gate_head.bias.value = jnp.full((1,), bias)
    pre = engine.prefill(model, prompt, mask, 8)
    h1 = pre.last_hidden
    h2 = h1 + jax.random.normal(jax.random.key(9), h1.shape)
    token = jnp.array([30, 31])
    run = lambda h: engine.step(model, pre.cache, pre.key_bias, h, token, jnp.zeros(2), 6, pre.num_real, 1.0)[1]
    outs[name] = float(jnp.abs(run(h1) - run(h2)).max())
  assert outs['open'] > 1e-2 and outs['closed'] < 1e-6


def test_no_recompilation_for_same_shapes():
  model = _model(True)
  prompt, mask = _prompts()
  cfg = _gen_cfg()
  engine.generate(model, prompt, mask, jax.random.key(0), 1.0, cfg)
  before = engine._generate_jit._cache_size()  # pylint: disable=protected-access
  out = engine.generate(model, prompt + 1, mask, jax.random.key(1), 0.5, cfg)
  chex.assert_shape((out.tokens, out.hidden_inputs), ((2, 10), (2, 10, 32)))
  assert engine._generate_jit._cache_size() == before  # pylint: disable=protected-access
