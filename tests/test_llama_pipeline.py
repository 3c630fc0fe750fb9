"""The rest of the project runs on a Llama / Qwen2 trunk (#19 item 1): `build_model` picks the family (a scratch
`config.model.family`, or a checkpoint's config.json), both training steps train a scratch GQA Llama with an untied
output layer, the engine decodes it as a full-recompute loop does, and the tiled output layer scores against its
`lm_head`. Tiny shapes, the GPT-2 compact vocabulary."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from dtt_jax import export, parallel, pipeline, tokens
from dtt_jax.model import build_model, hf_io, llama, lora, output_layer
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import causal_bias, positions_from_mask
from dtt_jax.rl import grpo, rollout
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.train import bootstrap, state as state_lib
from tests.test_bootstrap_step import make_batch as bootstrap_batch
from tests.test_engine import _gen_cfg, _prompts, naive_scores
from tests.test_grpo import CFG, G, TAU, VOCAB, _as_batch, _rewards
from tests.test_grpo import _prompts as grpo_prompts

# 2 layers, 4 query heads over 2 kv heads, untied output layer; VOCAB: 100 compact tokens (eos 0, bot 1, eot 2)
TINY = llama.LlamaConfig(vocab_rows=VOCAB.num_rows, num_tokens=VOCAB.num_tokens, n_positions=64, n_embd=32, n_layer=2,
                         n_head=4, n_kv_head=2, head_dim=8, intermediate_size=64, tie_word_embeddings=False)
TX = optax.adam(1e-3)  # no warmup: the first update moves every parameter with a gradient


def _model_cfg():
  """config.model of a scratch TINY-shaped Llama, gate logit bias 0 (gates spread over (0, 1))."""
  m = base.get_config().model
  m.update(dict(family='llama', n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, n_positions=64,
                tie_word_embeddings=False, gate_bias_init=0.0))
  return m


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(graphdef, state, ids):
  trunk = nnx.merge(graphdef, state)
  mask = jnp.ones(ids.shape, jnp.int32)
  return trunk.logits(trunk(trunk.embed(ids), positions_from_mask(mask), causal_bias(mask))[0])


def _logits(trunk, ids) -> np.ndarray:
  """ids [B,T] (unpadded) -> the trunk's logits [B,T,V], in one jitted call (eager dispatch compiles each op)."""
  return np.asarray(_jit_logits(*nnx.split(trunk), jnp.asarray(ids)))


@functools.lru_cache(maxsize=None)
def _scratch_llama():
  """-> (the DTT model built from `_model_cfg()`, its graphdef, host params), built once for the two steps."""
  model = build_model(_model_cfg(), VOCAB)
  graphdef, params = state_lib.split_model(model)
  return model, graphdef, jax.device_get(params)  # host copy: the steps donate the state's buffers


def _moved(before, after, *path) -> bool:
  """Whether the parameter at `path` (keys into the nested params dicts) differs between the two."""
  for key in path:
    before, after = before[key], after[key]
  return float(np.abs(np.asarray(after) - np.asarray(before)).max()) > 0


def test_bootstrap_step_trains_a_scratch_llama():
  """build_model with config.model.family='llama' gives the configured GQA, untied trunk; one Stage-1 step (fast
  unroll, fused cross-entropy against lm_head) has a finite loss and moves the gate, lm_head and wte."""
  model, graphdef, params = _scratch_llama()
  assert isinstance(model.gpt2, llama.Llama) and model.gpt2.cfg == TINY
  mesh = parallel.make_mesh(1)
  step = bootstrap.make_train_step(graphdef, TX, bootstrap.LossConfig(), mesh)
  state, metrics = step(parallel.replicate(state_lib.init_state(params, TX, seed=0), mesh),
                        parallel.shard_batch(bootstrap_batch(), mesh), 0.8)
  new = jax.device_get(state.params)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  for path in (('gate_head', 'kernel'), ('gate_head', 'bias'), ('gpt2', 'lm_head', 'embedding'),
               ('gpt2', 'wte', 'embedding'), ('gpt2', 'layers', 0, 'self_attn', 'k_proj', 'kernel')):
    assert _moved(params, new, *path), path


def test_grpo_step_trains_a_scratch_llama():
  """A GRPO rollout and step on the scratch Llama: the step's re-scored log-probs and gates (fused log-probs against
  lm_head) equal the engine's at the first iteration, the KL to an identical reference is 0, the loss is finite and
  the gate and lm_head move."""
  mesh = parallel.make_mesh(1)
  _, graphdef, params = _scratch_llama()
  prompt, mask = rollout.repeat_prompts(*grpo_prompts(), G)
  out, ref_logprobs = rollout.make_rollout_fn(graphdef, CFG, VOCAB, mesh)(params, params, prompt, mask,
                                                                         jax.random.key(0), jnp.float32(TAU))
  batch = rollout.shard_rollout(_as_batch(out, ref_logprobs, prompt, mask, _rewards()), mesh, G)
  state, metrics = grpo.make_grpo_step(graphdef, TX, CFG, mesh)(
      parallel.replicate(state_lib.init_state(params, TX, seed=0), mesh), batch)
  metrics, new = jax.device_get((metrics, state.params))
  assert np.isfinite(float(metrics['loss']))
  assert float(metrics['logprob_mismatch_max']) < 1e-4 and float(metrics['gate_mismatch']) < 1e-5
  assert abs(float(metrics['kl'])) < 1e-5
  for path in (('gate_head', 'kernel'), ('gpt2', 'lm_head', 'embedding')):
    assert _moved(params, new, *path), path


def _gated_model(cfg=TINY, seed: int = 0) -> DTTModel:
  """A DTT model around a fresh Llama with a random gate head (bias 0) and the projection: the latent path runs."""
  model = DTTModel(DTTConfig(cfg, gate_bias_init=0.0, use_projection=True), rngs=nnx.Rngs(seed))
  model.gate_head.kernel.value = 0.5 * jax.random.normal(jax.random.key(seed + 1), (cfg.n_embd, 1))
  return model


def test_greedy_generation_equals_naive_loop():
  """The engine on an untied GQA Llama (KV cache of n_kv_head heads, the cached transposed output kernel made from
  lm_head) gives the logits, greedy tokens and gates of re-running the full forward pass at every step."""
  model = _gated_model()
  prompt, mask = _prompts()
  cache = jax.eval_shape(lambda: engine.prefill(model, prompt, mask, 12).cache)
  assert cache.k[0].shape == (2, TINY.n_kv_head, 12, TINY.head_dim)
  out = engine.generate(model, prompt, mask, jax.random.key(0), 0.7,
                        _gen_cfg(max_new_tokens=6, sampling=SamplingConfig(greedy=True)), return_logits=True)
  ref_logits, ref_gates = naive_scores(model, prompt, mask, out.tokens, out.gate_noise, 0.7)
  np.testing.assert_array_equal(out.tokens, jnp.argmax(ref_logits, -1))
  np.testing.assert_allclose(out.logits, ref_logits, atol=1e-4)
  np.testing.assert_allclose(out.gates, ref_gates, atol=1e-5)
  assert float(out.gates.min()) < 0.3 and float(out.gates.max()) > 0.7  # the latent path is really exercised


def test_fused_output_layer_equals_plain_logits_on_untied_llama(monkeypatch):
  """The tiled cross-entropy (loss, argmax, gradients) and log-probs of an untied Llama equal those of its plain
  logits: both score against lm_head, which gets the output layer's gradient (wte none: it is not the output)."""
  monkeypatch.setattr(output_layer, 'tile_width', lambda v: min(32, v))  # 4 vocabulary tiles
  graphdef, params = state_lib.split_model(llama.Llama(TINY, rngs=nnx.Rngs(0)))
  hidden = jax.random.normal(jax.random.key(0), (4, 6, TINY.n_embd))
  targets = jax.random.randint(jax.random.key(1), (4, 6), 0, TINY.num_tokens)
  weights = jax.random.uniform(jax.random.key(2), (4, 6)) * (jnp.arange(6) % 3 > 0)

  def objective(p, h, fused):
    trunk = nnx.merge(graphdef, p)
    total, argmax = output_layer.cross_entropy(trunk, h, targets, weights, fused)
    logp, _ = output_layer.token_logprobs(trunk, h, targets, 0.8, fused)
    return total + jnp.sum(weights * logp), (total, argmax, logp)

  grad_fn = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True), static_argnums=2)
  (grads, (total, argmax, logp)), (ref_grads, (ref_total, ref_argmax, ref_logp)) = (
      grad_fn(params, hidden, True), grad_fn(params, hidden, False))
  np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-5)
  np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
  weighted = np.asarray(weights) > 0
  np.testing.assert_array_equal(np.asarray(argmax)[weighted], np.asarray(ref_argmax)[weighted])
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(x, y, atol=1e-5 * max(float(jnp.abs(y).max()), 1e-12),
                               err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(grads[0]['lm_head']['embedding']).max()) > 1e-3
  assert float(jnp.abs(grads[0]['wte']['embedding']).max()) == 0.0


@pytest.mark.parametrize('cls,tied', [('LlamaConfig', False), ('Qwen2Config', True)])
def test_build_model_takes_the_family_from_config_json(cls, tied, tmp_path):
  """config.model.init = a tiny transformers checkpoint with GPT-2's token rows: build_model loads the family of
  its config.json (even with config.model.family left at 'gpt2'), maps the rows into the compact vocabulary (the
  DTT specials copy the '<<' row) and gives transformers' logits of the matching GPT-2 ids."""
  torch = pytest.importorskip('torch', reason='transformers saves the checkpoint: pip install -r requirements-dev.txt')
  transformers = pytest.importorskip('transformers')
  hf_cfg = getattr(transformers, cls)(vocab_size=tokens.GPT2_BASE_VOCAB, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, tie_word_embeddings=tied)
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
  hf_model.save_pretrained(tmp_path)
  model_cfg = base.get_config().model
  model_cfg.init = str(tmp_path)
  model = build_model(model_cfg, VOCAB)
  trunk = model.gpt2
  assert isinstance(trunk, llama.Llama) and trunk.cfg.family == cls[:-6].lower()
  assert trunk.cfg.tie_word_embeddings == tied and (trunk.lm_head is None) == tied
  assert (trunk.cfg.num_tokens, trunk.cfg.n_kv_head) == (VOCAB.num_tokens, 2)
  source = hf_io.gpt2_row_source(VOCAB, tokens.GPT2_BASE_VOCAB)
  assert set(source[1:5]) == {tokens.COPY_EMBEDDING_FROM_ID}  # bot, eot, latent, pause
  ids = np.array([[7, 30, 2, 55, 12]])  # model ids (2: <|eot|>, a copy of '<<')
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(source[ids])).logits.numpy()[..., source]
  np.testing.assert_allclose(_logits(trunk, ids)[..., :VOCAB.num_tokens], want, atol=1e-4)


@pytest.mark.parametrize('key,value,message', [
    ('family', 'mistral', "config.model.family='mistral': expected one of 'gpt2', 'llama', 'qwen2'"),
    ('n_kv_head', 3, 'config.model.n_kv_head=3: expected 0 (= n_head) or a divisor of config.model.n_head=4'),
    ('n_embd', 36, r'config.model.n_embd=36 / config.model.n_head=4: expected an even integer'),
])
def test_bad_family_and_llama_sizes_are_named(key, value, message):
  """A bad family or scratch Llama size is a config error naming the key and what it expects."""
  config = base.get_config()
  config.model.family, config.model.n_head = 'llama', 4
  config.model[key] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    pipeline.check_config(config)


def test_lora_on_a_llama_exports_merged_weights(hf_tokenizer, tmp_path):
  """LoRA with the Llama family's target names wraps those projections (biasless kernels, as Llama's); the export of
  a Llama run (`export.write_export`) is a Llama checkpoint with the adapters merged: `load_model` reads it back to
  the LoRA model's logits. GPT-2's target names on a Llama are an error naming config.lora.targets and the valid
  names."""
  targets = ('self_attn.q_proj', 'self_attn.v_proj', 'mlp.down_proj')
  lora_cfg = ml_collections.ConfigDict(dict(enabled=True, rank=4, alpha=8.0, targets=targets,
                                            train_modules=('wte', 'lm_head')))
  model = build_model(_model_cfg(), VOCAB, lora_cfg=lora_cfg)
  block = model.gpt2.layers[1]
  wrapped = [block.self_attn.q_proj, block.self_attn.v_proj, block.mlp.down_proj]
  assert all(isinstance(m, lora.LoRALinear) for m in wrapped) and not isinstance(block.mlp.up_proj, lora.LoRALinear)
  for i, m in enumerate(wrapped):  # B = 0 at init: make the adapters change the function
    m.lora.lora_b.value = 0.3 * jax.random.normal(jax.random.key(i), m.lora.lora_b.value.shape)
  export.write_export(model, tokens.Tokenizer(hf_tokenizer, VOCAB), str(tmp_path), 'bootstrap', 0.1)
  reloaded = hf_io.load_model(str(tmp_path))
  assert isinstance(reloaded, llama.Llama) and reloaded.cfg == TINY
  ids = np.array([[7, 30, 2, 55, 12]])
  np.testing.assert_allclose(_logits(reloaded, ids), _logits(model.gpt2, ids), atol=1e-5)
  gpt2_targets = base.get_config().lora  # the default targets: GPT-2's
  gpt2_targets.enabled = True
  with pytest.raises(ValueError, match=r"config.lora.targets=\('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'"
                                       r"\): expected a non-empty subset of \('self_attn.q_proj', "):
    lora.apply_lora(model.gpt2, lora.LoRAConfig.from_config(gpt2_targets), nnx.Rngs(0))
