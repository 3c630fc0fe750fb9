"""Stage-1 loss and train step: the loss equals its formula, sharding and gradient accumulation change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dtt_jax import parallel
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2Config
from dtt_jax.sampling import engine
from dtt_jax.train import bootstrap, state as state_lib

EOS, BOT, EOT = 0, 1, 2
TINY = GPT2Config(vocab_rows=128, num_tokens=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def make_batch(b: int = 8, seed: int = 0):
  """Prompts of 6 (left-padded), completions `<bot> [fillers] <eot> a a <eos>` padded to 10."""
  rng = np.random.RandomState(seed)
  p, t = 6, 10
  batch = {k: np.zeros((b, p if k.startswith('prompt') else t), np.int32) for k in bootstrap.BATCH_FIELDS}
  for i in range(b):
    n_prompt = rng.randint(2, p + 1)
    batch['prompt'][i, p - n_prompt:] = rng.randint(5, 100, n_prompt)
    batch['prompt_mask'][i, p - n_prompt:] = 1
    n_fill = rng.randint(0, 4) if i % 2 else 0
    answer = list(rng.randint(5, 100, 2))
    seq = [BOT] + list(rng.randint(5, 100, n_fill)) + [EOT] + answer + [EOS]
    batch['completion'][i, :len(seq)] = seq
    batch['completion'][i, len(seq):] = EOS
    batch['completion_mask'][i, :len(seq)] = 1
    batch['inner_mask'][i, 1:1 + n_fill] = 1
    batch['filler_mask'][i, 1:1 + n_fill] = 1
    batch['outer_mask'][i] = batch['completion_mask'][i] - batch['inner_mask'][i]
    batch['loss_mask'][i] = batch['completion_mask'][i] - batch['filler_mask'][i]
  return batch


def _model():
  model = DTTModel(DTTConfig(TINY, gate_bias_init=0.0), rngs=nnx.Rngs(0))
  model.gate_head.kernel.value = 0.3 * jax.random.normal(jax.random.key(1), (32, 1))
  return model


def test_loss_equals_formula():
  model = _model()
  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  noise = jax.random.logistic(jax.random.key(2), batch['completion'].shape)
  cfg = bootstrap.LossConfig(hinge_lambda=0.7)
  counts = bootstrap._counts(batch)  # pylint: disable=protected-access
  loss, metrics = bootstrap.loss_terms(model, batch, noise, 0.5, cfg, counts)
  # Reference: the same unroll, then CE and hinge written out with numpy.
  bias = np.where(np.asarray(batch['filler_mask']) > 0, np.log(0.3), 0.0)
  out = engine.unroll(model, batch['prompt'], batch['prompt_mask'], batch['completion'], noise, 0.5,
                      completion_key_bias=jnp.asarray(bias))
  logp = np.asarray(jax.nn.log_softmax(model.gpt2.logits(out.target_hidden)))
  target = np.asarray(batch['completion'])
  nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
  lm, im, om = (np.asarray(batch[k], np.float64) for k in ('loss_mask', 'inner_mask', 'outer_mask'))
  g = np.asarray(out.gates, np.float64)
  ce = (nll * lm).sum() / lm.sum()
  hinge = (np.maximum(0.9 - g, 0) * im).sum() / im.sum() + (np.maximum(g - 0.1, 0) * om).sum() / om.sum()
  np.testing.assert_allclose(float(metrics['ce']), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['hinge']), hinge, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ce + 0.7 * hinge, rtol=1e-5)
  # The noisy-span bias matters: without it the loss differs.
  loss_plain, _ = bootstrap.loss_terms(model, batch, noise, 0.5, cfg.__class__(hinge_lambda=0.7, noisy_span_scale=1.0),
                                       counts)
  assert abs(float(loss_plain) - float(loss)) > 1e-6


def _run_steps(num_devices: int, microbatches: int = 1, steps: int = 2, gate_noise: bool = True):
  mesh = parallel.make_mesh(num_devices)
  graphdef, params = state_lib.split_model(_model())
  tx = state_lib.make_optimizer(1e-2, 10, 2, 0.01, 1.0, gate_lr_mult=3.0)
  state = parallel.replicate(state_lib.init_state(params, tx, seed=0), mesh)
  step = bootstrap.make_train_step(graphdef, tx, bootstrap.LossConfig(gate_noise=gate_noise), mesh, microbatches)
  for i in range(steps):
    state, metrics = step(state, parallel.shard_batch(make_batch(8, seed=i), mesh), 0.8)
  return jax.device_get(state), jax.device_get(metrics)


def _assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.skipif(jax.device_count() < 4, reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=4')
def test_four_devices_equal_one():
  s1, m1 = _run_steps(1)
  s4, m4 = _run_steps(4)
  assert int(s4.step) == 2
  _assert_trees_close(s1.params, s4.params, atol=1e-5)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)


def test_gradient_accumulation_equals_full_batch():
  s1, m1 = _run_steps(1, microbatches=1, gate_noise=False)
  s2, m2 = _run_steps(1, microbatches=2, gate_noise=False)
  _assert_trees_close(s1.params, s2.params, atol=1e-5)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)


def test_step_changes_gate_params_at_their_learning_rate():
  """Gate parameters get their own learning rate: with gate_lr_mult=0 they never move, the trunk does."""
  mesh = parallel.make_mesh(1)
  graphdef, params = state_lib.split_model(_model())
  tx = state_lib.make_optimizer(1e-2, 10, 1, 0.0, 1.0, gate_lr_mult=0.0)
  params = jax.device_get(params)  # host copy: the step donates the state's buffers
  state = parallel.replicate(state_lib.init_state(params, tx, seed=0), mesh)
  step = bootstrap.make_train_step(graphdef, tx, bootstrap.LossConfig(), mesh)
  new, metrics = step(state, parallel.shard_batch(make_batch(), mesh), 1.0)  # step 0: warmup lr is 0
  new, metrics = step(new, parallel.shard_batch(make_batch(), mesh), 1.0)
  np.testing.assert_array_equal(new.params['gate_head']['kernel'], params['gate_head']['kernel'])
  assert float(jnp.abs(new.params['gpt2']['ln_f']['bias'] - params['gpt2']['ln_f']['bias']).max()) > 0
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
