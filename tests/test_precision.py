"""bfloat16 compute with float32 master weights (#19 item 3): with `config.model.dtype='bfloat16'` matmuls and
attention run in bfloat16 while parameters, gradients and optimizer state stay float32 (`config.model.param_dtype`),
and logits, log-probs and the loss are float32.

Tiny models learn a fixed pattern first (token t is followed by NEXT[t], a permutation), so their greedy choices are
not near-ties and a broken bfloat16 path would show: GPT-2 by the real bfloat16 bootstrap step, a GQA Llama by a
float32 next-token loop. Then, against float32 on the same parameters:
  * greedy generation (the engine) picks the same token at >= AGREEMENT of the positions (both families);
  * the bfloat16 bootstrap step's loss is within LOSS_RTOL (relative) of the float32 loss, its gradients finite,
    and parameters and Adam moments come out float32 (exactly);
  * bfloat16 logits are float32 sums of bfloat16 products, and the tiled output layer agrees with them;
  * a bad dtype is an error naming its config key, and train steps refuse bfloat16 parameters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from dtt_jax import parallel, tokens
from dtt_jax.model import build_model, check_master_weights, output_layer, trunk_config
from dtt_jax.model.gpt2 import causal_bias, positions_from_mask
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.train import bootstrap, state as state_lib

VOCAB = tokens.Vocab.compact([range(1000, 1095)])  # 100 tokens (eos 0, bot 1, eot 2), 128 rows
IDS = np.arange(5, VOCAB.num_tokens)  # the pattern's tokens (no specials)
NEXT = np.zeros(VOCAB.num_tokens, np.int32)
NEXT[IDS] = np.random.RandomState(0).permutation(IDS)
P, T = 4, 8  # prompt and completion lengths (training and generation)
TRAIN_STEPS = 60
AGREEMENT = 0.95  # greedy tokens equal, bfloat16 vs float32 (measured: 1.0 for both families)
LOGIT_RTOL = 3e-2  # engine logits while both runs saw the same tokens, / max |logit| (measured: 0.5%, 1.0%)
LOSS_RTOL = 2e-2  # bootstrap loss, bfloat16 vs float32 (measured: 1.3e-3)


def _model_cfg(family: str, dtype: str, param_dtype: str = 'float32'):
  """config.model of a tiny scratch trunk: 2 layers, D 32, 4 heads (Llama: 2 kv heads, untied output layer)."""
  m = base.get_config().model
  m.update(dict(family=family, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, n_positions=32,
                tie_word_embeddings=family == 'gpt2', dtype=dtype, param_dtype=param_dtype))
  return m


def _graphdef(family: str, dtype: str):
  """The graph of the model `_model_cfg` describes (shapes only: nothing initialised)."""
  return nnx.split(nnx.eval_shape(lambda: build_model(_model_cfg(family, dtype), VOCAB)))[0]


def _init_params(family: str):
  """Fresh float32 parameters (seed 0) of the model, initialised in one compiled program."""
  return jax.jit(lambda: state_lib.split_model(build_model(_model_cfg(family, 'float32'), VOCAB))[1])()


def _sequences(batch: int, length: int, seed: int) -> np.ndarray:
  """[batch, length] runs of the pattern from random starting tokens."""
  seqs = np.zeros((batch, length), np.int32)
  seqs[:, 0] = np.random.RandomState(seed).choice(IDS, batch)
  for j in range(1, length):
    seqs[:, j] = NEXT[seqs[:, j - 1]]
  return seqs


def _bootstrap_batch(seed: int, b: int = 16):
  """A Stage-1 batch of pattern runs: a prompt of P tokens, a completion of the next T (answer tokens only)."""
  seqs = _sequences(b, P + T, seed)
  batch = {k: np.zeros((b, P if k.startswith('prompt') else T), np.int32) for k in bootstrap.BATCH_FIELDS}
  batch.update(prompt=seqs[:, :P], completion=seqs[:, P:])
  for k in ('prompt_mask', 'completion_mask', 'loss_mask', 'outer_mask'):
    batch[k][:] = 1
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope='module')
def gpt2_bf16():
  """TRAIN_STEPS bfloat16 bootstrap steps (the real jitted step: fast unroll, fused output layer, Adam) on the
  pattern from a fresh GPT-2 -> (params before the last step, the final state, the last step's metrics and batch)."""
  mesh = parallel.make_mesh(1)
  tx = state_lib.make_optimizer(1e-2, TRAIN_STEPS, 0, 0.01, 1.0, schedule='constant')
  state = parallel.replicate(state_lib.init_state(_init_params('gpt2'), tx, seed=0), mesh)
  step = bootstrap.make_train_step(_graphdef('gpt2', 'bfloat16'), tx, bootstrap.LossConfig(gate_noise=False), mesh)
  for i in range(TRAIN_STEPS):
    before, batch = jax.device_get(state.params), _bootstrap_batch(seed=i)  # a host copy: the step donates the state
    state, metrics = step(state, batch, 1.0)
  return before, jax.device_get(state), jax.device_get(metrics), batch


@functools.partial(jax.jit, static_argnums=(0, 1))
def _lm_train(graphdef, tx, params, seqs):
  """Adam steps of next-token cross-entropy on the trunk (float32), one per seqs[i] [B, P + T] -> params."""

  def loss(p, ids):
    trunk = nnx.merge(graphdef, p).gpt2
    mask = jnp.ones(ids[:, :-1].shape, jnp.int32)
    hidden, _ = trunk(trunk.embed(ids[:, :-1]), positions_from_mask(mask), causal_bias(mask))
    return jnp.mean(output_layer.plain_cross_entropy(trunk, hidden, ids[:, 1:])[0])

  def step(carry, ids):
    p, opt = carry
    updates, opt = tx.update(jax.grad(loss)(p, ids), opt, p)
    return (optax.apply_updates(p, updates), opt), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), seqs)
  return params


@functools.lru_cache(maxsize=None)
def _trained_llama():
  seqs = np.stack([_sequences(16, P + T, seed) for seed in range(TRAIN_STEPS)])
  return jax.device_get(_lm_train(_graphdef('llama', 'float32'), optax.adam(1e-2), _init_params('llama'),
                                  jnp.asarray(seqs)))


# --------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_greedy_generation_in_bfloat16_matches_float32(family, request):
  """The same trained float32 parameters decoded greedily by the engine with float32 and bfloat16 compute: the
  float32 model follows the pattern (its choices are not ties), bfloat16 picks the same token at >= AGREEMENT of the
  positions, and where both runs saw the same tokens so far their logits agree to LOGIT_RTOL of the largest."""
  params = request.getfixturevalue('gpt2_bf16')[1].params if family == 'gpt2' else _trained_llama()
  prompt = jnp.asarray(_sequences(16, P, seed=1000))
  mask = jnp.ones(prompt.shape, jnp.int32)
  cfg = engine.GenerateConfig(max_new_tokens=T, eos_id=VOCAB.eos, bot_id=VOCAB.bot, eot_id=VOCAB.eot, segment=T,
                              early_stop=False, return_hidden=False, sampling=SamplingConfig(greedy=True))
  out = {dtype: engine.generate(nnx.merge(_graphdef(family, dtype), params), prompt, mask, jax.random.key(0), 1.0,
                                cfg, return_logits=True) for dtype in ('float32', 'bfloat16')}
  tok32, tok16 = (np.asarray(out[d].tokens) for d in ('float32', 'bfloat16'))
  prev = np.concatenate([np.asarray(prompt[:, -1:]), tok32[:, :-1]], axis=1)
  follows = np.mean(tok32 == NEXT[prev])
  agreement = np.mean(tok32 == tok16)
  same_inputs = np.cumprod(np.concatenate([np.ones_like(tok32[:, :1]), tok32[:, :-1] == tok16[:, :-1]], 1), 1) > 0
  logits32, logits16 = (np.asarray(out[d].logits)[..., :VOCAB.num_tokens] for d in ('float32', 'bfloat16'))
  logit_diff = np.abs(logits32 - logits16).max(-1)[same_inputs].max() / np.abs(logits32).max()
  print(f'{family}: float32 follows the pattern at {follows:.3f}; bfloat16 = float32 at {agreement:.3f} of '
        f'{tok32.size} tokens, logits within {logit_diff:.4f} of max |logit| {np.abs(logits32).max():.2f}')
  assert follows >= 0.8
  assert agreement >= AGREEMENT
  assert logit_diff <= LOGIT_RTOL


def test_bfloat16_step_keeps_float32_parameters_and_optimizer_state(gpt2_bf16):
  before, state, _, _ = gpt2_bf16
  float_dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
  assert float_dtypes(state.params) == {jnp.dtype(jnp.float32)}
  assert float_dtypes(state.opt_state) == {jnp.dtype(jnp.float32)}  # Adam's moments
  moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
  assert np.all(np.isfinite(moved)) and max(moved) > 0


def test_bfloat16_step_loss_matches_float32(gpt2_bf16):
  """The last bfloat16 step's loss (of the parameters before its update) against the float32 Stage-1 loss of the
  same parameters and batch (plain output layer: an independent reference); its gradient norm finite, nonzero."""
  params, _, metrics, batch = gpt2_bf16

  @jax.jit
  def loss32(params, batch):
    counts = bootstrap._counts(batch)  # pylint: disable=protected-access
    noise = jnp.zeros(batch['completion'].shape, jnp.float32)
    return bootstrap.loss_terms(nnx.merge(_graphdef('gpt2', 'float32'), params), batch, noise, 1.0,
                                bootstrap.LossConfig(fused_output=False), counts)

  loss, metrics32 = loss32(params, batch)
  rel = abs(float(metrics['loss']) - float(loss)) / float(loss)
  print(f'bootstrap loss: float32 {float(loss):.5f}, bfloat16 {float(metrics["loss"]):.5f} (relative {rel:.2e}); '
        f'token accuracy {float(metrics32["token_accuracy"]):.3f} / {float(metrics["token_accuracy"]):.3f}')
  assert float(loss) < 1.0  # learned: far from the uniform log(100) = 4.6
  assert rel < LOSS_RTOL
  assert np.isfinite(metrics['grad_norm']) and metrics['grad_norm'] > 0


def test_bfloat16_logits_accumulate_in_float32(gpt2_bf16):
  """Under bfloat16 compute the logits are float32 sums of bfloat16 products (not bfloat16-rounded sums), and the
  tiled output layer's cross-entropy and log-probs equal the plain log-softmax of those logits."""
  params = gpt2_bf16[1].params
  ids = jnp.asarray(_sequences(4, P + T, seed=3000))

  @jax.jit
  def outputs(params, ids):
    trunk = nnx.merge(_graphdef('gpt2', 'bfloat16'), params).gpt2
    mask = jnp.ones(ids.shape, jnp.int32)
    hidden, _ = trunk(trunk.embed(ids), positions_from_mask(mask), causal_bias(mask))
    targets = jnp.roll(ids, -1, axis=1)
    fused_ce, _ = output_layer.cross_entropy(trunk, hidden, targets, jnp.ones(ids.shape), fused=True)
    fused_logp, _ = output_layer.token_logprobs(trunk, hidden, targets, fused=True)
    return hidden, trunk.logits(hidden), trunk.output_table(), fused_ce, fused_logp, targets

  hidden, logits, table, fused_ce, fused_logp, targets = outputs(params, ids)
  assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32 and table.dtype == jnp.float32
  exact = (np.asarray(hidden, np.float64)
           @ np.asarray(jnp.asarray(table, jnp.bfloat16), np.float64)[:VOCAB.num_tokens].T)  # [B,T,V]
  np.testing.assert_allclose(np.asarray(logits, np.float64)[..., :VOCAB.num_tokens], exact, atol=1e-5)
  rounded = np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64)
  assert np.abs(rounded - exact).max() > 1e-3  # so a bfloat16 result would have failed the check above
  logp = np.asarray(jax.nn.log_softmax(logits[..., :VOCAB.num_tokens]))
  target_logp = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(fused_logp), target_logp, atol=1e-5)
  np.testing.assert_allclose(float(fused_ce), -target_logp.sum(), rtol=1e-5)


def test_bfloat16_parameters_are_for_inference_only():
  """param_dtype='bfloat16' stores every parameter (gate included) in bfloat16, and a train step refuses them,
  naming config.model.param_dtype; param_dtype='float32' keeps them float32 under bfloat16 compute."""
  params = lambda *dtypes: nnx.state(nnx.eval_shape(lambda: build_model(_model_cfg('llama', *dtypes), VOCAB)),
                                     nnx.Param)  # shapes and dtypes only
  assert {x.dtype for x in jax.tree.leaves(params('bfloat16', 'bfloat16'))} == {jnp.dtype(jnp.bfloat16)}
  with pytest.raises(ValueError, match=r'config\.model\.param_dtype="float32"'):
    check_master_weights(params('bfloat16', 'bfloat16'))
  assert {x.dtype for x in jax.tree.leaves(params('bfloat16', 'float32'))} == {jnp.dtype(jnp.float32)}
  check_master_weights(params('bfloat16', 'float32'))


@pytest.mark.parametrize('key, value', [('dtype', 'bf16'), ('dtype', 'float16'), ('param_dtype', 'half')])
def test_bad_dtype_names_its_key(key, value):
  m = _model_cfg('gpt2', 'float32')
  m[key] = value
  with pytest.raises(ValueError, match=rf"config\.model\.{key}='{value}': expected one of 'float32', 'bfloat16'"):
    trunk_config(m, VOCAB)
