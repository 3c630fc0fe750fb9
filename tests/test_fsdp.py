"""Sharded parameters (FSDP) on a ('data', 'fsdp') mesh: the rule table gives the stated specs, the bootstrap and GRPO
steps and a rollout on fsdp=4 and data=2 x fsdp=2 equal the 1-device ones, per-device memory falls to about 1/fsdp,
and checkpoints saved sharded restore exactly onto other mesh shapes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dtt_jax import parallel, tokens
from dtt_jax.checkpoint import Checkpointer
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2Config
from dtt_jax.rl import grpo, rollout
from dtt_jax.sampling import engine
from dtt_jax.train import bootstrap, state as state_lib
from tests.test_bootstrap_step import make_batch as bootstrap_batch

pytestmark = pytest.mark.skipif(jax.device_count() < 4,
                                reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=4')

VOCAB = tokens.Vocab.compact([range(1000, 1095)])  # 100 tokens (eos 0, bot 1, eot 2), 128 rows
TINY = GPT2Config(vocab_rows=VOCAB.num_rows, num_tokens=VOCAB.num_tokens, n_positions=32, n_embd=64, n_layer=1,
                  n_head=4)  # one layer: each sharded step compiles in seconds
MESHES = {'1': (1, 1), 'fsdp4': (4, 4), '2x2': (4, 2)}  # name -> (num_devices, fsdp)
B, G, P_LEN, T = 4, 2, 6, 8
CFG = grpo.GRPOConfig(num_generations=G, beta=0.1, temperature=0.8, max_new_tokens=T, max_think=3, mu=2,
                      gate_as_action=True)
F = 'fsdp'
# The rule table on the tiny model at fsdp=4: (path, shape) -> spec. Arrays under 2**10 elements are replicated;
# the others are split on their largest dimension (the first of equal ones).
EXPECTED_SPECS = {
    "['gate_head']['bias']": ((1,), P()),
    "['gate_head']['kernel']": ((64, 1), P()),
    "['gpt2']['h'][0]['attn']['c_attn']['bias']": ((192,), P()),
    "['gpt2']['h'][0]['attn']['c_attn']['kernel']": ((64, 192), P(None, F)),
    "['gpt2']['h'][0]['attn']['c_proj']['kernel']": ((64, 64), P(F, None)),
    "['gpt2']['h'][0]['ln_1']['scale']": ((64,), P()),
    "['gpt2']['h'][0]['mlp']['c_fc']['bias']": ((256,), P()),
    "['gpt2']['h'][0]['mlp']['c_fc']['kernel']": ((64, 256), P(None, F)),
    "['gpt2']['h'][0]['mlp']['c_proj']['kernel']": ((256, 64), P(F, None)),
    "['gpt2']['wpe']['embedding']": ((32, 64), P(None, F)),
    "['gpt2']['wte']['embedding']": ((128, 64), P(F, None)),
    "['proj']['kernel']": ((64, 64), P(F, None)),
}


def mesh_of(name: str):
  return parallel.make_mesh(*MESHES[name])


@functools.lru_cache(maxsize=None)
def _model_params():
  """-> (graphdef, host params) of a tiny DTT model whose gates spread over (0, 1)."""
  model = DTTModel(DTTConfig(TINY, gate_bias_init=0.0, use_projection=True), rngs=nnx.Rngs(0))
  model.gate_head.kernel.value = 0.5 * jax.random.normal(jax.random.key(1), (TINY.n_embd, 1))
  graphdef, params = state_lib.split_model(model)
  return graphdef, jax.device_get(params)


def _tx():
  """The pipeline's optimizer (gate / trunk groups, masked weight decay)."""
  return state_lib.make_optimizer(1e-2, 10, 0, 0.01, 1.0, gate_lr_mult=3.0)


# The steps' optimizer: Adam with eps 1e-6. Some gradients are exactly 0 in exact arithmetic (the key bias: softmax
# ignores a shift common to all keys) and float noise (1e-9) in practice; Adam with eps 1e-8 turns that noise into
# updates of ~lr in a direction that changes with the summation order, of the devices as of anything else.
STEP_TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-6, weight_decay=0.01))


def _state(mesh, seed: int = 0, tx=None):
  _, params = _model_params()
  return parallel.shard_state(state_lib.init_state(params, tx or _tx(), seed=seed), mesh)


def _spec(x) -> P:
  """The PartitionSpec of an array or a NamedSharding."""
  return getattr(x, 'sharding', x).spec


def _leaves(tree, *parts: str) -> list:
  """The leaves whose path (keystr) contains every one of `parts` in order."""
  def match(path):
    key, at = jax.tree_util.keystr(path), 0
    for part in parts:
      at = key.find(part, at)
      if at < 0:
        return False
    return True
  return [x for path, x in jax.tree_util.tree_leaves_with_path(tree) if match(path)]


def _assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_rule_table():
  _, params = _model_params()
  specs = {jax.tree_util.keystr(path): (x.shape, _spec(s)) for (path, x), s in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(parallel.state_shardings(params, mesh_of('fsdp4'))))}
  assert {k: specs[k] for k in EXPECTED_SPECS} == EXPECTED_SPECS
  assert f'{list(EXPECTED_SPECS)[3]} [64, 192] -> {P(None, F)}' in parallel.spec_table(params, mesh_of('fsdp4'))
  # The largest dimension divisible by fsdp; none divisible or small: replicated; fsdp=1: everything replicated.
  assert parallel.param_spec((50257, 768), 4) == P(None, F)
  assert parallel.param_spec((768, 3072), 4) == P(None, F)
  assert parallel.param_spec((99, 25), 4) == P()
  assert parallel.param_spec((8, 64), 4) == P()  # 512 elements
  assert parallel.param_spec((2, 512, 1024), 2) == P(None, None, F)
  assert parallel.param_spec((768, 3072), 1) == P()
  assert parallel.shard_shape((50257, 768), 4) == (50257, 192) and parallel.shard_shape((99, 25), 4) == (99, 25)
  # A TrainState: the optimizer moments mirror the params; step, key and Adam's count are replicated.
  state = parallel.state_shardings(state_lib.init_state(params, _tx(), seed=0), mesh_of('2x2'))
  assert _spec(state.params['gpt2']['wte']['embedding']) == P(F, None)
  moments = _leaves(state.opt_state, "['trunk']", '.mu', "['wte']['embedding']")
  moments += _leaves(state.opt_state, "['trunk']", '.nu', "['wte']['embedding']")
  assert len(moments) == 2 and all(_spec(s) == P(F, None) for s in moments)
  counts = _leaves(state.opt_state, '.count')
  assert counts and all(_spec(s) == P() for s in counts)
  assert _spec(state.step) == P() and _spec(state.key) == P()
  replicated = parallel.state_shardings(params, mesh_of('1'))
  assert all(_spec(s) == P() for s in jax.tree.leaves(replicated))


def test_mesh_shapes_and_errors():
  mesh = mesh_of('2x2')
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2} and parallel.num_shards(mesh) == 4
  batch = parallel.shard_batch({'x': np.arange(8)}, mesh)['x']
  assert sorted((s.index[0].start, s.index[0].stop) for s in batch.addressable_shards) == [(0, 2), (2, 4), (4, 6),
                                                                                           (6, 8)]
  with pytest.raises(ValueError, match=r'config.parallel.fsdp=3 must divide the number of devices, 4'):
    parallel.make_mesh(4, fsdp=3)
  with pytest.raises(ValueError, match=r'grpo.prompts_per_step=6 must be divisible by the number of batch shards '
                     r'\(4 = data 2 x fsdp 2\)'):
    parallel.check_divisible(6, mesh, 'grpo.prompts_per_step')


def test_per_device_memory_falls_to_about_one_over_fsdp():
  replicated, sharded = _state(mesh_of('1')), _state(mesh_of('fsdp4'))
  for tree in (sharded.params, sharded.opt_state):
    per_device, total = parallel.state_bytes(tree, mesh_of('fsdp4'))
    on_device0 = sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                     if s.device == jax.devices()[0])
    assert per_device == on_device0 and per_device <= 0.3 * total, (per_device, total)
    assert parallel.state_bytes(tree, mesh_of('1')) == (per_device, total)  # placed arrays: by their sharding
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # unplaced: by the rule table
    assert parallel.state_bytes(abstract, mesh_of('fsdp4')) == (per_device, total)
  for tree in (replicated.params, replicated.opt_state):
    assert parallel.state_bytes(tree, mesh_of('1'))[0] == parallel.state_bytes(tree, mesh_of('1'))[1]
  line = parallel.describe_memory(sharded, mesh_of('fsdp4'))
  print(line)
  assert line.startswith('Per device (data=1, fsdp=4): params ') and '(0.2' in line


# ----------------------------------------------------------------------------------------------------- bootstrap


# The plain loss (autodiff of the unroll, untiled output layer) compiles faster; the step gathers the parameters
# before the loss, so the loss runs as under data parallelism (tests/test_bootstrap_step.py: the defaults on 4
# devices equal 1).
LOSS = bootstrap.LossConfig(fast_unroll=False, fused_output=False)


def _bootstrap_steps(name: str, steps: int = 2):
  mesh = mesh_of(name)
  graphdef, _ = _model_params()
  state = _state(mesh, tx=STEP_TX)
  step = bootstrap.make_train_step(graphdef, STEP_TX, LOSS, mesh)
  for i in range(steps):
    state, metrics = step(state, parallel.shard_batch(bootstrap_batch(8, seed=i), mesh), 0.8)
  return state, jax.device_get(metrics)


def test_bootstrap_step_sharded_equals_one_device():
  s1, m1 = _bootstrap_steps('1')
  for name in ('fsdp4', '2x2'):
    s, m = _bootstrap_steps(name)
    assert _spec(s.params['gpt2']['wte']['embedding']) == P(F, None)  # the state stays sharded
    assert [_spec(x) for x in _leaves(s.opt_state, '.mu', "['wte']['embedding']")] == [P(F, None)]
    _assert_trees_close(jax.device_get(s1.params), jax.device_get(s.params), atol=1e-5)
    _assert_trees_close(jax.device_get(s1.opt_state), jax.device_get(s.opt_state), atol=1e-5)
    np.testing.assert_allclose(m1['loss'], m['loss'], rtol=1e-5)
    np.testing.assert_allclose(m1['grad_norm'], m['grad_norm'], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------- GRPO


def _prompts(seed: int = 0):
  rng = np.random.RandomState(seed)
  prompt, mask = np.zeros((B, P_LEN), np.int32), np.zeros((B, P_LEN), np.int32)
  for i in range(B):
    n = rng.randint(2, P_LEN + 1)
    prompt[i, P_LEN - n:] = rng.randint(5, VOCAB.num_tokens, n)
    mask[i, P_LEN - n:] = 1
  return rollout.repeat_prompts(prompt, mask, G)


def _rollout(name: str, seed: int):
  """A rollout on mesh `name` with the params and a different reference, both laid out by the rule table."""
  mesh = mesh_of(name)
  graphdef, params = _model_params()
  reference = parallel.shard_state(jax.tree.map(lambda x: 0.9 * x, params), mesh)
  prompt, mask = parallel.to_global(_prompts(seed), mesh)
  fn = rollout.make_rollout_fn(graphdef, CFG, VOCAB, mesh)
  out, ref_logprobs = fn(parallel.shard_state(params, mesh), reference, prompt, mask, jax.random.key(seed),
                         jnp.float32(0.7))
  return jax.device_get((out, ref_logprobs))


def _assert_rollouts_close(a, b):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  _assert_trees_close(dataclasses.replace(a, tokens=None), dataclasses.replace(b, tokens=None), 1e-5)


def _grpo_batch(out, ref_logprobs, seed: int) -> rollout.RolloutBatch:
  """Rollout + synthetic rewards (group 1 with zero spread) -> a host RolloutBatch (inner span: positions 1, 2)."""
  prompt, mask = _prompts(seed)
  n = B * G
  inner = np.zeros((n, T), np.float32)
  inner[:, 1:3] = out.mask[:, 1:3]
  rewards = np.random.RandomState(seed).randn(n).astype(np.float32)
  rewards[G:2 * G] = 0.5
  return rollout.RolloutBatch(
      prompt=prompt, prompt_mask=mask, completion=out.tokens, completion_mask=out.mask, forced=out.forced,
      logprobs=out.logprobs, ref_logprobs=ref_logprobs, gates=out.gates, gate_noise=out.gate_noise,
      hidden_inputs=out.hidden_inputs, inner_mask=inner, outer_mask=(out.mask - inner).astype(np.float32),
      tau=np.full((n,), 0.7, np.float32), rewards=rewards, stats={'accuracy': (rewards > 0).astype(np.float32)})


def test_rollout_and_grpo_step_sharded_equal_one_device():
  """Generation (the GRPO rollout, engine.generate) with sharded params and reference gives the 1-device rollout;
  two GRPO steps (mu=2) on rollouts give the 1-device params, optimizer state and metrics at fsdp=4 and 2x2."""
  rollouts = [_rollout('1', seed) for seed in (0, 1)]
  out, ref_logprobs = _rollout('2x2', 0)
  _assert_rollouts_close(out, rollouts[0][0])
  np.testing.assert_allclose(ref_logprobs, rollouts[0][1], atol=1e-5)
  assert np.abs(ref_logprobs - out.logprobs).max() > 1e-3  # the reference is another model
  # engine.generate (evaluation, validation) on a model merged from sharded params: the same completions.
  graphdef, params = _model_params()
  mesh = mesh_of('2x2')
  prompt, mask = parallel.to_global(_prompts(0), mesh)
  model = nnx.merge(graphdef, parallel.shard_state(params, mesh))
  generated = engine.generate(model, prompt, mask, jax.random.key(0), 0.7, rollout.generate_config(CFG, VOCAB))
  _assert_rollouts_close(jax.device_get(generated), rollouts[0][0])
  batches = [_grpo_batch(*r, seed) for seed, r in enumerate(rollouts)]
  graphdef, _ = _model_params()
  results = {}
  for name in ('1', 'fsdp4', '2x2'):
    mesh = mesh_of(name)
    step, state = grpo.make_grpo_step(graphdef, STEP_TX, CFG, mesh), _state(mesh, seed=1, tx=STEP_TX)
    for batch in batches:
      state, metrics = step(state, rollout.shard_rollout(batch, mesh, G))
    assert _spec(state.params['gpt2']['h'][0]['mlp']['c_fc']['kernel']) == (P() if name == '1' else P(None, F))
    results[name] = jax.device_get((state, metrics))
  (s1, m1) = results['1']
  assert int(s1.step) == 2 and float(m1['loss']) != 0.0
  for name in ('fsdp4', '2x2'):
    s, m = results[name]
    _assert_trees_close(s1.params, s.params, atol=1e-5)
    _assert_trees_close(s1.opt_state, s.opt_state, atol=1e-5)
    for k in m1:
      np.testing.assert_allclose(m1[k], m[k], rtol=1e-4, atol=1e-6, err_msg=f'{name} {k}')


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_saved_sharded_restores_on_other_mesh_shapes(tmp_path):
  saved = _state(mesh_of('fsdp4'), seed=3)
  host = jax.device_get(saved)
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(5, saved, {'data': {'epoch': 1}})
  ckpt.wait()
  for name in ('1', '2x2', 'fsdp4'):
    mesh = parallel.make_mesh(4, MESHES[name][1])  # data=4 x fsdp=1, 2x2, fsdp=4
    layout = parallel.state_shardings(host, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), host, layout)
    step, state, meta = ckpt.restore_latest(abstract)
    assert step == 5 and meta['data'] == {'epoch': 1}
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(layout), strict=True):
      assert x.sharding == s, (name, x.sharding, s)
    _assert_trees_close(host, jax.device_get(state), atol=0.0)
    reader = Checkpointer(str(tmp_path), async_save=False)  # as a later stage reads a finished one
    params = reader.restore_params(5, abstract.params)
    reader.close()
    assert _spec(params['gpt2']['wte']['embedding']) == (P() if name == '1' else P(F, None))
    _assert_trees_close(host.params, jax.device_get(params), atol=0.0)
  ckpt.close()
