"""What makes the large runs fit changes no number: block rematerialization (`model.remat`), GRPO gradient
accumulation (`grpo.microbatches`), per-layer FSDP gathers, gradients of the trained parameters only, and the
GRPO reference without the frozen trunk (`grpo.reference_params`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from dtt_jax import parallel, tokens
from dtt_jax.model import build_model, gpt2
from dtt_jax.rl import grpo, rollout
from dtt_jax.train import bootstrap, grads, state as state_lib
from tests.test_bootstrap_step import make_batch as bootstrap_batch

pytestmark = pytest.mark.skipif(jax.device_count() < 4,
                                reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=4')

VOCAB = tokens.Vocab.compact([range(1000, 1095)])  # 100 tokens (eos 0, bot 1, eot 2), 128 rows
MESHES = {'1': (1, 1), 'fsdp4': (4, 4), '2x2': (4, 2)}  # name -> (num_devices, fsdp)
B, G, P, T = 4, 2, 6, 8  # prompts, completions per prompt, prompt and completion lengths
TRAINED = grads.trained_filter(('wte',))


def _model(remat: str, gate: str, n_layer: int = 2, d: int = 32):
  """(graphdef, params) of a Qwen2 with LoRA on q_proj and up_proj (trained: adapters, gate, wte)."""
  c = base.get_config()
  m = c.model
  m.family, m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.intermediate_size = 'qwen2', n_layer, d, 4, 2, 2 * d
  m.n_positions, m.gate, m.gate_bias_init, m.remat = 32, gate, 0.0, remat
  c.lora.enabled, c.lora.rank, c.lora.targets = True, 2, ('self_attn.q_proj', 'mlp.up_proj')
  model = build_model(m, VOCAB, seed=0, lora_cfg=c.lora)
  graphdef, params = state_lib.split_model(model)
  rng = np.random.RandomState(1)  # adapters away from B = 0, gate parameters away from their init
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * rng.randn(*x.shape).astype(np.float32)
      if any(getattr(k, 'key', None) in ('lora_b', 'gate_head', 'gate_r', 'gate_i') for k in path) else x, params)
  return graphdef, params


def _sgd():
  """Plain SGD at lr 1 on the trained parameters, zero on the frozen base: the update is minus the gradient."""
  labels = lambda p: state_lib.param_labels(p, ('wte',))
  return optax.multi_transform({'trunk': optax.sgd(1.0), 'gate': optax.sgd(1.0), 'base': optax.set_to_zero()}, labels)


def _grpo_batch(seed: int = 0, d: int = 32) -> grpo.RolloutBatch:
  """A synthetic rollout of B x G completions: random tokens after left-padded prompts, stored hidden states,
  gate noise, rollout and reference log-probs, rewards with one all-equal group."""
  rng = np.random.RandomState(seed)
  n = B * G
  prompt = rng.randint(5, 100, (n, P)).astype(np.int32)
  prompt_mask = np.ones((n, P), np.int32)
  prompt_mask[::3, :2] = 0
  completion = rng.randint(3, 100, (n, T)).astype(np.int32)
  completion_mask = (np.arange(T) < rng.randint(3, T + 1, (n, 1))).astype(np.int32)
  inner = np.zeros((n, T), np.float32)
  inner[:, 1:3] = completion_mask[:, 1:3]
  rewards = rng.randn(n).astype(np.float32)
  rewards[G:2 * G] = 0.5
  f32 = lambda *s: rng.randn(*s).astype(np.float32)
  return grpo.RolloutBatch(
      prompt=prompt, prompt_mask=prompt_mask, completion=completion, completion_mask=completion_mask,
      forced=np.zeros((n, T), np.int32), logprobs=-np.abs(f32(n, T)), ref_logprobs=-np.abs(f32(n, T)),
      gates=rng.rand(n, T).astype(np.float32), gate_noise=f32(n, T), hidden_inputs=f32(n, T, d),
      inner_mask=inner, outer_mask=completion_mask - inner, tau=np.full((n,), 0.7, np.float32), rewards=rewards,
      stats={'accuracy': (rewards > 0).astype(np.float32)})


def _update(step_fn, params, batch, mesh, *args):
  """(new params - params, metrics) of one step on `mesh` (host arrays)."""
  params = jax.device_get(params)  # the step donates its state
  state = parallel.shard_state(state_lib.init_state(params, _sgd(), seed=0), mesh)
  new, metrics = step_fn(state, batch, *args)
  new = jax.device_get(new.params)
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), new, params), \
      jax.device_get(metrics)


def _assert_same(a, b, what: str):
  (da, ma), (db, mb) = a, b
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(da), jax.tree.leaves(db), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=0, err_msg=f'{what} {jax.tree_util.keystr(path)}')
  for k in ma:
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-7, err_msg=f'{what} {k}')


def test_grpo_update_is_the_same_with_remat_microbatches_and_per_layer_gathers():
  """One GRPO step (LoRA, gate as an action) with remat 'block' / 'dots', 2 microbatches, at fsdp 4 (per-layer
  gathers) and 2 x 2: the gradient of the plain 1-device step within 1e-6, the same metrics; the frozen base
  does not move, the adapters, gate and embedding do."""
  cfg = grpo.GRPOConfig(num_generations=G, beta=0.1, temperature=0.8, max_new_tokens=T, gate_as_action=True)
  host = _grpo_batch()
  results = {}
  for remat, micro, mesh_name in (('none', 1, '1'), ('block', 2, 'fsdp4'), ('dots', 2, '2x2')):
    graphdef, params = _model(remat, 'dtt')
    mesh = parallel.make_mesh(*MESHES[mesh_name])
    step = grpo.make_grpo_step(graphdef, _sgd(), dataclasses.replace(cfg, microbatches=micro), mesh, TRAINED)
    results[remat, micro, mesh_name] = _update(step, params, rollout.shard_rollout(host, mesh, G), mesh)
  delta, _ = reference = results['none', 1, '1']
  layer = delta['gpt2']['layers'][0]
  for frozen in (layer['mlp']['down_proj']['kernel'], layer['mlp']['up_proj']['kernel']):
    assert np.abs(frozen).max() == 0
  for moved in (layer['mlp']['up_proj']['lora']['lora_a'], delta['gpt2']['wte']['embedding'],
                delta['gate_head']['kernel']):
    assert np.abs(moved).max() > 1e-5
  for key, result in results.items():
    _assert_same(result, reference, str(key))


def test_bootstrap_update_is_the_same_with_remat_and_fsdp():
  """One bootstrap step (HRPO gate through the hand-written recurrent backward, LoRA, 2 microbatches) at fsdp 4 and
  2 x 2, where the vocabulary tables stay sharded (remat set, which the recurrence leaves out): the plain 1-device
  step's gradient within 1e-6."""
  batch = bootstrap_batch(8, seed=3)
  results = {}
  for remat, mesh_name in (('none', '1'), ('block', 'fsdp4'), ('dots', '2x2')):
    graphdef, params = _model(remat, 'hrpo', n_layer=1)
    mesh = parallel.make_mesh(*MESHES[mesh_name])
    step = bootstrap.make_train_step(graphdef, _sgd(), bootstrap.LossConfig(hinge_lambda=0.5), mesh, 2, TRAINED)
    results[remat] = _update(step, params, parallel.shard_batch(batch, mesh), mesh, 0.8)
  delta = results['none'][0]
  assert np.abs(delta['hrpo']['gate_r']['kernel']).max() > 1e-5 and np.abs(delta['gpt2']['wte']['embedding']).max() > 0
  for remat in ('block', 'dots'):
    _assert_same(results[remat], results['none'], remat)


def test_the_lora_reference_keeps_only_trained_leaves_and_scores_as_a_full_copy():
  """`grpo.reference_params` of a LoRA model holds the adapters, gate and embedding (None at the frozen base, which
  the rollout takes from the policy); its reference log-probs equal those of a full copy of the start params."""
  graphdef, start = _model('none', 'dtt')
  reference = grpo.reference_params(start, TRAINED)
  kept = sum(x.size for x in jax.tree.leaves(reference))
  trained = sum(x.size for x, t in zip(jax.tree.leaves(start), jax.tree.leaves(TRAINED(start))) if t)
  assert kept == trained < 0.75 * sum(x.size for x in jax.tree.leaves(start))
  assert reference['gpt2']['layers'][0]['mlp']['down_proj']['kernel'] is None
  policy = grads.combine(jax.tree.map(lambda x: x + 0.05, reference), start)  # the trained leaves moved on
  cfg = grpo.GRPOConfig(num_generations=G, beta=0.1, temperature=0.8, max_new_tokens=T)
  mesh = parallel.make_mesh(1)
  fn = rollout.make_rollout_fn(graphdef, cfg, VOCAB, mesh)
  prompt, mask = rollout.repeat_prompts(_grpo_batch().prompt[::G], _grpo_batch().prompt_mask[::G], G)
  args = (jnp.asarray(prompt), jnp.asarray(mask), jax.random.key(0), jnp.float32(0.7))
  out, shared = fn(policy, reference, *args)
  out_full, full = fn(policy, start, *args)
  np.testing.assert_array_equal(out.tokens, out_full.tokens)
  np.testing.assert_array_equal(shared, full)
  assert np.abs(np.asarray(shared) - np.asarray(out.logprobs)).max() > 1e-3  # the reference is not the policy


def test_bad_remat_and_microbatches_are_config_errors():
  with pytest.raises(ValueError, match="config.model.remat='all': expected one of 'none', 'block', 'dots'"):
    gpt2.GPT2Config(remat='all')
  with pytest.raises(ValueError, match='grpo.microbatches=0 must be >= 1'):
    grpo.GRPOConfig(microbatches=0)
  graphdef, params = _model('none', 'dtt')
  mesh = parallel.make_mesh(4, 4)
  step = grpo.make_grpo_step(graphdef, _sgd(), grpo.GRPOConfig(num_generations=G, microbatches=4), mesh, TRAINED)
  state = parallel.shard_state(state_lib.init_state(params, _sgd(), seed=0), mesh)
  with pytest.raises(ValueError, match=r'grpo.microbatches=4: the 2 completions per device .* must be divisible'):
    step.lower(state, rollout.shard_rollout(_grpo_batch(), mesh, G))
