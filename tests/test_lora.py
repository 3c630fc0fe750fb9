"""LoRA (`config.lora`): the adapted projection equals its formula, a pretrained HF checkpoint + LoRA exports (merged)
to an HF GPT-2 with the same logits, training moves only adapters, gate and `train_modules` with no optimizer moments
for the frozen base, fine-tuning a full bootstrap checkpoint with fresh adapters (GRPO via `config.init_from`) starts
from the same function and evaluates from its own checkpoint, and the switch from configs."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dtt_jax import parallel, pipeline, tokens
from dtt_jax.methods import base
from dtt_jax.methods import dtt as dtt_method
from dtt_jax.model import build_model, hf_io, lora
from dtt_jax.model.gpt2 import causal_bias, positions_from_mask
from dtt_jax.rl import grpo, rollout
from dtt_jax.train import bootstrap, state as state_lib

EOS, BOT, EOT = 0, 1, 2


def _lora_cfg(rank=4, alpha=8.0, targets=lora.TARGETS):
  return ml_collections.ConfigDict(dict(enabled=True, rank=rank, alpha=alpha, targets=targets))


def _model_cfg(**kw):
  c = importlib.import_module('configs.base').get_config().model
  c.n_layer, c.n_embd, c.n_head, c.n_positions = 2, 32, 4, 64
  c.update(kw)
  return c


def _randomize_adapters(model, seed: int) -> None:
  """Nonzero B (zero at init), so the adapters change the function."""
  for i, (_, var) in enumerate(nnx.iter_graph(model)):
    if isinstance(var, nnx.LoRAParam):
      var.value = 0.3 * jax.random.normal(jax.random.key(seed + i), var.value.shape)


def test_lora_linear_equals_formula():
  base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  w, b = np.asarray(base.kernel.value, np.float64), np.asarray(base.bias.value, np.float64)
  layer = lora.LoRALinear(base, rank=2, alpha=3.0, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (4, 6))
  np.testing.assert_array_equal(layer(x), base(x))  # B = 0 at init: exactly the base
  _randomize_adapters(layer, 3)
  a_, b_ = (np.asarray(v.value, np.float64) for v in (layer.lora.lora_a, layer.lora.lora_b))
  expected = np.asarray(x, np.float64) @ (w + 1.5 * a_ @ b_) + b
  np.testing.assert_allclose(layer(x), expected, atol=1e-5)
  np.testing.assert_allclose(layer.merged_kernel(), w + 1.5 * a_ @ b_, atol=1e-6)
  assert layer.kernel is base.kernel  # the base's own variable, same path


def test_pretrained_checkpoint_with_lora_exports_merged_weights_with_equal_logits(tmp_path):
  """config.model.init = a local HF GPT-2 dir (full vocabulary) + LoRA; `export_pretrained` merges the adapters:
  HF PyTorch GPT2LMHeadModel on the export gives the LoRA model's logits, which differ from the base's."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  src = tmp_path / 'hf_tiny'
  transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                                       n_head=4)).save_pretrained(src)
  model = build_model(_model_cfg(init=str(src), vocab='full'), tokens.Vocab.full(), lora_cfg=_lora_cfg())
  assert isinstance(model.gpt2.h[1].mlp.c_proj, lora.LoRALinear)
  _randomize_adapters(model, 0)
  ids = np.random.RandomState(0).randint(0, 50257, (2, 10))
  mask = np.ones_like(ids)
  mask[1, :4] = 0

  def logits(gpt2):
    h, _ = gpt2(gpt2.embed(jnp.asarray(ids)), positions_from_mask(jnp.asarray(mask)), causal_bias(jnp.asarray(mask)))
    return np.asarray(gpt2.logits(h))[..., :50257]

  ours = logits(model.gpt2)
  out = tmp_path / 'export'
  hf_io.export_pretrained(model.gpt2, str(out))
  hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids[:, :]), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits.float().numpy()
  theirs = theirs[..., :50257]
  real = mask > 0
  assert np.abs(ours - theirs)[real].max() < 1e-4
  base = hf_io.load_pretrained(str(src), vocab=tokens.Vocab.full())
  assert np.abs(logits(base) - ours)[real].max() > 1e-2  # the adapters matter, so the merge is really tested
  assert isinstance(model.gpt2.h[0].attn.c_attn, lora.LoRALinear)  # the merge copies; the model keeps its adapters


def _stage1_batch(b: int = 4):
  """Prompts [b,6] (left-padded), completions `<bot> x y <eot> a <eos>` [b,6] with a 2-token span."""
  rng = np.random.RandomState(0)
  batch = {'prompt': rng.randint(5, 100, (b, 6)), 'prompt_mask': np.ones((b, 6), np.int32)}
  batch['prompt_mask'][0, :2] = 0
  batch['completion'] = np.stack([[BOT, *rng.randint(5, 100, 2), EOT, rng.randint(5, 100), EOS] for _ in range(b)])
  batch['completion_mask'] = np.ones((b, 6), np.int32)
  batch['inner_mask'] = np.tile([0, 1, 1, 0, 0, 0], (b, 1))
  batch['filler_mask'] = np.zeros((b, 6), np.int32)
  batch['outer_mask'] = batch['completion_mask'] - batch['inner_mask']
  batch['loss_mask'] = batch['completion_mask']
  return {k: v.astype(np.int32) for k, v in batch.items()}


def _grpo_batch(graphdef, params, cfg, vocab, mesh):
  """A real rollout of 2 prompts x G with synthetic rewards."""
  prompt, mask = rollout.repeat_prompts(np.array([[0, 0, 15, 16], [20, 21, 22, 23]], np.int32),
                                        np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int32), cfg.num_generations)
  out, ref = rollout.make_rollout_fn(graphdef, cfg, vocab, mesh)(params, params, prompt, mask, jax.random.key(0),
                                                                 jnp.float32(1.0))
  out, ref = jax.device_get((out, ref))
  n, t = out.tokens.shape
  rewards = np.random.RandomState(1).randn(n).astype(np.float32)
  batch = rollout.RolloutBatch(
      prompt=prompt, prompt_mask=mask, completion=out.tokens, completion_mask=out.mask, forced=out.forced,
      logprobs=out.logprobs, ref_logprobs=ref, gates=out.gates, gate_noise=out.gate_noise,
      hidden_inputs=out.hidden_inputs, inner_mask=np.zeros((n, t), np.float32),
      outer_mask=out.mask.astype(np.float32), tau=np.ones((n,), np.float32), rewards=rewards,
      stats={'accuracy': (rewards > 0).astype(np.float32)})
  return rollout.shard_rollout(batch, mesh, cfg.num_generations)


def _leaves(params) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize('gate,train_modules', [('hrpo', ()), ('dtt', ('wte',))], ids=['hrpo', 'dtt+wte'])
def test_training_moves_only_adapters_gate_and_train_modules(gate, train_modules):
  """3 bootstrap steps, then 2 GRPO steps (the pipeline's optimizers, `config.lora.train_modules`): every base
  parameter is bit-identical, every adapter B, gate and train_modules parameter moved, and the optimizer state holds
  Adam moments for exactly those. Both gates, with and without train_modules (wte stays frozen without it)."""
  vocab = tokens.Vocab.compact([range(1000, 1095)])
  model = build_model(_model_cfg(gate=gate, gate_bias_init=0.0), vocab, lora_cfg=_lora_cfg())
  graphdef, params = state_lib.split_model(model)
  start = jax.device_get(params)
  counts = lora.count_params(start)
  labels = _leaves(state_lib.param_labels(start, train_modules))
  trainable = sum(x.size for k, x in _leaves(start).items() if labels[k] != 'base')
  gate_size = sum(x.size for k, x in _leaves(start).items() if labels[k] == 'gate')
  wte_size = start['gpt2']['wte']['embedding'].size
  assert trainable == counts['lora'] + gate_size + (wte_size if train_modules else 0)
  assert counts['lora'] < counts['total'] // 2
  assert (labels["['gpt2']['wte']['embedding']"] == 'trunk') == bool(train_modules)
  mesh = parallel.make_mesh(1)

  config = importlib.import_module('configs.lora').get_config()
  config.bootstrap.warmup_steps, config.grpo.warmup_steps = 1, 1
  config.lora.train_modules = train_modules
  tx = dtt_method.bootstrap_optimizer(config)
  state = parallel.replicate(state_lib.init_state(start, tx, seed=0), mesh)
  opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert opt_size == 2 * trainable + 4  # mu and nu of the trained leaves + 2 step counts per label (trunk, gate)
  loss_cfg = bootstrap.LossConfig(hinge_lambda=1.0, fast_unroll=False, fused_output=False)  # compiles faster
  step = bootstrap.make_train_step(graphdef, tx, loss_cfg, mesh)
  for _ in range(3):
    state, _ = step(state, parallel.shard_batch(_stage1_batch(), mesh), 1.0)

  cfg = grpo.GRPOConfig(num_generations=4, beta=0.1, max_new_tokens=6, max_think=2)
  g_tx = grpo.make_grpo_optimizer(config.grpo, config.lora.train_modules)
  g_state = parallel.replicate(state_lib.init_state(jax.device_get(state.params), g_tx, seed=1), mesh)
  g_step = grpo.make_grpo_step(graphdef, g_tx, cfg, mesh)
  for _ in range(2):
    g_state, _ = g_step(g_state, _grpo_batch(graphdef, g_state.params, cfg, vocab, mesh))

  before, after = _leaves(start), _leaves(jax.device_get(g_state.params))
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  for key, label in labels.items():
    if label == 'base':
      assert key not in moved, key
    elif key.endswith("['lora_b']") or label == 'gate' or 'wte' in key:
      assert key in moved, key
  assert ("['gpt2']['wte']['embedding']" in moved) == bool(train_modules)


def test_switch_from_configs():
  vocab = tokens.Vocab.compact([range(1000, 1095)])
  config = importlib.import_module('configs.lora').get_config()
  pipeline.check_config(config)
  model = build_model(config.model, vocab, lora_cfg=config.lora)
  for block in model.gpt2.h:
    for module in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
      assert isinstance(module, lora.LoRALinear) and module.lora.lora_a.value.shape[1] == 16 and module.scale == 2.0
  plain = importlib.import_module('configs.quickstart').get_config()
  model = build_model(plain.model, vocab, lora_cfg=plain.lora)
  assert lora.count_params(nnx.state(model, nnx.Param))['lora'] == 0
  assert type(model.gpt2.h[0].attn.c_attn) is nnx.Linear  # pylint: disable=unidiomatic-typecheck
  config.lora.targets = ('attn.c_attn', 'c_proj')
  with pytest.raises(ValueError, match=r"config.lora.targets=\('attn.c_attn', 'c_proj'\): expected a non-empty subset"):
    pipeline.check_config(config)
  config.lora.targets, config.lora.rank = lora.TARGETS, 0
  with pytest.raises(ValueError, match='config.lora.rank=0 must be a positive integer'):
    pipeline.check_config(config)
  config.lora.rank, config.lora.train_modules = 16, ('wte', 'lm_head')
  with pytest.raises(ValueError,
                     match=r"config.lora.train_modules=\('wte', 'lm_head'\): unknown module\(s\) \['lm_head'\]"):
    pipeline.check_config(config)


def _tiny_config(workdir_config: str = 'configs.quickstart', **lora_kw):
  config = importlib.import_module(workdir_config).get_config()
  config.num_devices = 1
  config.model.n_layer, config.model.n_embd, config.model.n_head = 1, 32, 2
  config.dataset.train_size, config.dataset.valid_size, config.dataset.max_digits = 300, 8, 2
  config.data.max_completion_len, config.generate.max_new_tokens, config.generate.batch_size = 12, 10, 8
  config.bootstrap.steps, config.bootstrap.batch_size, config.bootstrap.warmup_steps = 2, 8, 1
  config.grpo.steps, config.grpo.prompts_per_step, config.grpo.num_generations = 1, 2, 4
  config.grpo.max_new_tokens, config.grpo.max_think, config.grpo.warmup_steps = 8, 2, 1
  config.lora.update(lora_kw)
  return config


def _gpt2_logits(graphdef, params, ids):
  gpt2 = nnx.merge(graphdef, params).gpt2
  mask = jnp.ones_like(ids)
  h, _ = gpt2(gpt2.embed(ids), positions_from_mask(mask), causal_bias(mask))
  return np.asarray(gpt2.logits(h))


def test_grpo_with_lora_from_a_full_bootstrap(tmp_path):
  """A full bootstrap (no adapters) in one workdir; GRPO with `config.lora.enabled` and `config.init_from` in another:
  the initial policy (and so the KL reference) is the bootstrap model (same weights, same logits; fresh adapters
  with B = 0), a GRPO update moves adapters, gate and `train_modules` ('wte') only, the GRPO run saves its adapters,
  evaluation loads them, and loading them into a model without LoRA fails naming config.lora."""
  base_dir, lora_dir = str(tmp_path / 'base'), str(tmp_path / 'lora')
  base_exp = pipeline.setup(_tiny_config(), base_dir)
  dtt_method.run_bootstrap(base_exp)
  base_graphdef, base_params = jax.device_get(base.stage_params(base_exp, 'bootstrap'))
  assert not state_lib.has_lora(base_params)

  config = _tiny_config(enabled=True, rank=4, alpha=8.0)
  config.stage, config.init_from = 'grpo', base_dir
  exp = pipeline.setup(config, lora_dir)
  graphdef, start = dtt_method.grpo_start_params(exp)
  start = jax.device_get(start)
  assert lora.adapter_shapes(start) and state_lib.has_lora(start)
  base_leaves, start_leaves = _leaves(base_params), _leaves(lora.without_adapters(start))
  assert base_leaves.keys() == start_leaves.keys()
  for key, value in base_leaves.items():
    np.testing.assert_array_equal(start_leaves[key], value, err_msg=key)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, exp.vocab.num_tokens, (2, 9)))
  np.testing.assert_array_equal(_gpt2_logits(graphdef, start, ids), _gpt2_logits(base_graphdef, base_params, ids))

  # GRPO updates with the pipeline's optimizer on real rollouts with random rewards (nonzero advantages); the first
  # update has lr 0 (warmup).
  mesh = parallel.make_mesh(1)
  cfg = grpo.GRPOConfig.from_config(config.grpo)
  tx = grpo.make_grpo_optimizer(config.grpo, config.lora.train_modules)
  g_state = parallel.replicate(state_lib.init_state(start, tx, seed=1), mesh)
  g_step = grpo.make_grpo_step(graphdef, tx, cfg, mesh)
  for _ in range(2):
    g_state, _ = g_step(g_state, _grpo_batch(graphdef, g_state.params, cfg, exp.vocab, mesh))
  labels = _leaves(state_lib.param_labels(start, config.lora.train_modules))
  after = _leaves(jax.device_get(g_state.params))
  moved = {k for k, v in _leaves(start).items() if not np.array_equal(v, after[k])}
  assert "['gpt2']['wte']['embedding']" in moved and any(k.endswith("['lora_b']") for k in moved)
  assert {k for k in moved if labels[k] == 'base'} == set()

  # The pipeline's GRPO run saves its adapters and evaluation restores them (not fresh ones). Its rewards may all be
  # equal (zero advantages), so weight decay makes sure the trained parameters move in 2 steps (lr 0 at the first).
  exp.config.grpo.steps, exp.config.grpo.weight_decay = 2, 0.5
  dtt_method.run_grpo(exp)
  trained = _leaves(jax.device_get(base.stage_params(exp, 'grpo'))[1])
  start_leaves = _leaves(start)
  moved = {k for k, v in start_leaves.items() if not np.array_equal(v, trained[k])}
  assert any(k.endswith("['lora_a']") for k in moved) and "['gpt2']['wte']['embedding']" in moved
  assert {k for k in moved if labels[k] == 'base'} == set()
  metrics = dtt_method.run_eval(exp)
  assert 0.0 <= metrics['structure_rate'] <= 1.0
  with open(f'{lora_dir}/eval/test/grpo/metrics.json') as f:
    assert '"stage": "grpo"' in f.read()
  plain = dataclasses.replace(exp, config=_tiny_config())
  with pytest.raises(ValueError, match=r'holds LoRA adapters \(rank 4 on .*\) but config.lora gives \(none\)'):
    base.stage_params(plain, 'grpo')
