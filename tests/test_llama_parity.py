"""The Flax Llama / Qwen2 (`model/llama.py`) reproduces HF PyTorch logits on a left-padded batch, decodes over a KV
cache exactly as its full forward, serves the unchanged engine and fast unroll, and round-trips through HF's format.

Each case is a tiny random checkpoint saved by transformers: odd head counts, GQA with 2 kv heads, tied and
untied embeddings, Qwen2's q/k/v biases, Llama's attention/MLP biases with head_dim != hidden / heads, RoPE
default / linear (old-style config.json) / llama3, and one sharded checkpoint (index file + shards).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dtt_jax import tokens
from dtt_jax.model import hf_io, llama
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import NEG_INF, KVCache, causal_bias, positions_from_mask
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.train import fast_unroll

torch = pytest.importorskip('torch', reason='torch (CPU) is the parity reference: pip install -r requirements-dev.txt')
transformers = pytest.importorskip('transformers')

VOCAB = 200  # padded to 256 rows in the Flax model
TOL = 1e-4
LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 64}  # head_dim 16, theta 5e5: high, medium and low bands all occur
CASES = {
    # name: (HF config class, config kwargs, save_pretrained kwargs, legacy config.json rewrite)
    'llama_3heads_tied_sharded': ('LlamaConfig', dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                                                      tie_word_embeddings=True), dict(max_shard_size='40KB'), None),
    'llama_gqa2_untied_llama3': ('LlamaConfig', dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                     tie_word_embeddings=False, rope_theta=500000.0,
                                                     rope_scaling=LLAMA3), {}, None),
    'llama_bias_headdim_linear': ('LlamaConfig', dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                                                      head_dim=16, attention_bias=True, mlp_bias=True,
                                                      tie_word_embeddings=False), {},
                                  {'rope_theta': 20000.0, 'rope_scaling': {'type': 'linear', 'factor': 2.0}}),
    'qwen2_gqa2_tied': ('Qwen2Config', dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True), {}, None),
    'qwen2_3heads_1kv_untied': ('Qwen2Config', dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                                    tie_word_embeddings=False, rope_theta=1e6), {}, None),
}
FIGURES = {}  # case -> {check: max abs diff}, printed at the end of the module (pytest -s)


def _randomize(model):
  """Every parameter random (HF initialises biases to 0 and norms to 1, which would hide a mapping error)."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      mean, std = (1.0, 0.2) if 'norm' in name else (0.0, 0.08)
      p.copy_(mean + std * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  """case -> directory of a random tiny checkpoint written by `save_pretrained` (built on first use)."""
  dirs = {}

  def get(case):
    if case not in dirs:
      cls, kw, save_kw, legacy = CASES[case]
      cfg = getattr(transformers, cls)(vocab_size=VOCAB, intermediate_size=72, num_hidden_layers=2,
                                       max_position_embeddings=128, **kw)
      model = transformers.AutoModelForCausalLM.from_config(cfg)
      _randomize(model)
      path = tmp_path_factory.mktemp(case)
      model.save_pretrained(path, **save_kw)
      if legacy:  # the config.json of transformers 4.x: top-level rope_theta + rope_scaling, no rope_parameters
        config = json.loads((path / 'config.json').read_text())
        config.pop('rope_parameters', None)
        config.update(legacy)
        (path / 'config.json').write_text(json.dumps(config))
      dirs[case] = path
    return dirs[case]
  yield get
  print('\nmax |logit diff| per case:', json.dumps(FIGURES, indent=1))


def _batch():
  """Left-padded batch [3,12]: rows with 0, 3 and 7 padding positions (pad id 0)."""
  ids = np.random.RandomState(0).randint(1, VOCAB, (3, 12))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  mask[2, :7] = 0
  ids[mask == 0] = 0
  return ids, mask


def _torch_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager').eval()


def _torch_logits(model, ids, mask):
  pos = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, ids, positions, bias, cache=None, index=0):
  """One jitted model call (eager op-by-op dispatch compiles every small op): -> (logits [B,T,V], cache)."""
  model = nnx.merge(graphdef, state)
  hidden, cache = model(model.embed(ids), positions, bias, cache, index)
  return model.logits(hidden), cache


def _jax_logits(model, ids, mask):
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  return np.asarray(_run(*nnx.split(model), ids, positions_from_mask(mask), causal_bias(mask))[0])


def _max_diff(a, b, mask):
  return float(np.abs(a[..., :VOCAB] - b[..., :VOCAB])[mask > 0].max())


def _record(case, check, value):
  FIGURES.setdefault(case, {})[check] = float(f'{value:.3g}')


@pytest.mark.parametrize('case', CASES)
def test_logits_match_torch_left_padded(case, hf_dirs):
  path = hf_dirs(case)
  model = hf_io.load_llama(str(path))
  cls, kw, _, _ = CASES[case]
  assert model.cfg.family == ('qwen2' if cls == 'Qwen2Config' else 'llama')
  assert model.cfg.tie_word_embeddings == kw['tie_word_embeddings'] and (model.lm_head is None) == kw[
      'tie_word_embeddings']
  assert (model.cfg.vocab_rows, model.cfg.num_tokens) == (256, VOCAB)
  ids, mask = _batch()
  ours = _jax_logits(model, ids, mask)
  diff = _max_diff(ours, _torch_logits(_torch_model(path), ids, mask), mask)
  _record(case, 'forward', diff)
  assert diff <= TOL
  assert (ours[..., VOCAB:] < -1e8).all()  # padded rows never sampled


def _decode_diff(model, cache, ids, mask, p):
  """Prefill the first p columns into `cache` (grown to all columns), then feed the rest one at a time as the
  engine does; -> max |diff| of the step logits against one full forward pass."""
  graphdef, state = nnx.split(model)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  b, s = ids.shape
  full = _run(graphdef, state, ids, positions_from_mask(mask), causal_bias(mask))[0]  # [B,S,V]
  key_bias = jnp.where(mask > 0, 0.0, NEG_INF)  # [B,S]
  logits, cache = _run(graphdef, state, ids[:, :p], positions_from_mask(mask[:, :p]), causal_bias(mask[:, :p]),
                       cache, 0)
  steps = [logits[:, -1]]
  cache = cache.grow(s)
  num_real = jnp.sum(mask[:, :p], -1)
  for t in range(p, s):
    bias = (key_bias + jnp.where(jnp.arange(s) <= t, 0.0, NEG_INF))[:, None, :]  # [B,1,S]
    logits, cache = _run(graphdef, state, ids[:, t:t + 1], (num_real + t - p)[:, None], bias, cache, t)
    steps.append(logits[:, 0])
  return float(jnp.abs(jnp.stack(steps, 1) - full[:, p - 1:])[..., :VOCAB].max())


@pytest.mark.parametrize('case', ['llama_gqa2_untied_llama3', 'qwen2_3heads_1kv_untied', 'llama_3heads_tied_sharded'])
def test_kv_cache_decode_equals_full_forward(case, hf_dirs):
  """Both cache layouts: n_kv_head heads (`llama.kv_cache`) and n_head heads (`gpt2.KVCache.zeros`, what the
  engine and the training stages allocate)."""
  model = hf_io.load_llama(str(hf_dirs(case)))
  ids, mask = _batch()
  ids, mask = ids[:, 2:], mask[:, 2:]  # row 2: the prompt (first 6 columns) still holds padding
  for name, cache in (('kv_heads', llama.kv_cache(model.cfg, 3, 6)), ('n_head', KVCache.zeros(model.cfg, 3, 6))):
    assert cache.k[0].shape[1] == (model.cfg.n_kv_head if name == 'kv_heads' else model.cfg.n_head)
    diff = _decode_diff(model, cache, ids, mask, 6)
    _record(case, f'decode_{name}', diff)
    assert diff <= 1e-5, name


@pytest.mark.parametrize('case', CASES)
def test_export_then_transformers_load_gives_same_logits(case, hf_dirs, tmp_path):
  model = hf_io.load_llama(str(hf_dirs(case)))
  hf_io.export_llama(model, str(tmp_path), special_ids={'eos_token_id': 2, 'pad_token_id': 0})
  reloaded = _torch_model(tmp_path)
  assert type(reloaded).__name__ == ('Qwen2ForCausalLM' if model.cfg.family == 'qwen2' else 'LlamaForCausalLM')
  assert reloaded.config.tie_word_embeddings == model.cfg.tie_word_embeddings
  ids, mask = _batch()
  diff = _max_diff(_jax_logits(model, ids, mask), _torch_logits(reloaded, ids, mask), mask)
  _record(case, 'export_reload', diff)
  assert diff <= TOL
  again = hf_io.load_llama(str(tmp_path))  # and our own loader reads it back to the same config
  assert again.cfg == model.cfg


def _greedy_torch(model, ids, mask, n):
  """Greedy decoding by full recomputation (no HF cache or generation config involved)."""
  ids, mask = torch.tensor(ids), torch.tensor(mask)
  for _ in range(n):
    pos = torch.clamp(mask.cumsum(-1) - 1, min=0)
    with torch.no_grad():
      nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
    ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
  return ids[:, -n:].numpy()


@pytest.mark.parametrize('case,transposed', [('qwen2_gqa2_tied', None), ('llama_gqa2_untied_llama3', False)])
def test_engine_generates_like_transformers(case, transposed, hf_dirs):
  """The unchanged engine with a Llama trunk in the DTT wrapper, the gate forced to 0 (`latent_id` never emitted):
  plain greedy decoding, equal to transformers'. The untied case without the transposed output kernel
  (`transposed_output=False`), the tied one with the engine's kernel cache (`output_table()`)."""
  path = hf_dirs(case)
  model = DTTModel(DTTConfig(), rngs=nnx.Rngs(0), gpt2=hf_io.load_llama(str(path)))
  ids, mask = _batch()
  never = 255  # a padded row: its logit is NEG_INF, so it is never emitted
  cfg = engine.GenerateConfig(max_new_tokens=6, eos_id=never, bot_id=never, eot_id=never, latent_id=never,
                              sampling=SamplingConfig(greedy=True), early_stop=False, segment=4,
                              transposed_output=transposed)
  out = engine.generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), cfg=cfg)
  np.testing.assert_array_equal(np.asarray(out.tokens), _greedy_torch(_torch_model(path), ids, mask, 6))


def test_fast_unroll_equals_engine_unroll_with_gradients(hf_dirs):
  """Stage 1's hand-written backward (`fast_unroll`, which splits out `wte` by name) runs unchanged on the Llama
  trunk and equals autodiff through `engine.unroll`."""
  model = DTTModel(DTTConfig(gate_bias_init=0.0), rngs=nnx.Rngs(0),
                   gpt2=hf_io.load_llama(str(hf_dirs('qwen2_gqa2_tied'))))
  model.gate_head.kernel.value = 0.5 * jax.random.normal(jax.random.key(1), model.gate_head.kernel.value.shape)
  graphdef, params = nnx.split(model)
  ids, mask = map(jnp.asarray, _batch())
  prompt, pmask, completion = ids[:, :8], mask[:, :8], ids[:, 8:]
  noise = jax.random.logistic(jax.random.key(2), completion.shape)

  def loss(p, fn):
    m = nnx.merge(graphdef, p)
    out = fn(m, prompt, pmask, completion, noise, 0.7)
    ce = optax.softmax_cross_entropy_with_integer_labels(m.gpt2.logits(out.target_hidden), completion).mean()
    return ce + jnp.mean(out.gates ** 2), out.target_hidden

  results = [jax.jit(jax.value_and_grad(lambda p, fn=fn: loss(p, fn), has_aux=True))(params)
             for fn in (fast_unroll.unroll, engine.unroll)]
  (v_fast, h_fast), g_fast = results[0]
  (v_ref, h_ref), g_ref = results[1]
  np.testing.assert_allclose(np.asarray(h_fast), np.asarray(h_ref), atol=1e-5)
  np.testing.assert_allclose(float(v_fast), float(v_ref), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * max(float(jnp.abs(b).max()), 1e-12))


def test_bfloat16_checkpoint_loads(hf_dirs, tmp_path):
  ref = _torch_model(hf_dirs('qwen2_gqa2_tied')).to(torch.bfloat16)
  ref.save_pretrained(tmp_path)
  model = hf_io.load_llama(str(tmp_path))
  want = ref.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(model.layers[1].self_attn.k_proj.kernel.value), want)


def test_load_model_dispatches_on_family(hf_dirs):
  assert isinstance(hf_io.load_model(str(hf_dirs('qwen2_gqa2_tied'))), llama.Llama)
  with pytest.raises(ValueError, match="200 token rows, but dtt_jax tokenizes with GPT-2's tokenizer"):
    hf_io.load_model(str(hf_dirs('qwen2_gqa2_tied')), vocab=tokens.Vocab.full())


def test_model_family():
  assert [hf_io.model_family({'model_type': t}) for t in ('gpt2', 'llama', 'qwen2')] == ['gpt2', 'llama', 'qwen2']
  with pytest.raises(ValueError, match=r"model_type='mistral'.*supported model_type values: gpt2, llama, qwen2"):
    hf_io.model_family({'model_type': 'mistral', 'architectures': ['MistralForCausalLM']})


@pytest.mark.parametrize('update,message', [
    ({'rope_parameters': {'rope_type': 'dynamic', 'factor': 2.0, 'rope_theta': 1e4}}, "rope_type='dynamic'"),
    ({'rope_parameters': {'rope_type': 'llama3', 'factor': 8.0, 'rope_theta': 1e4}}, "lacks the key 'low_freq_factor'"),
    ({'use_sliding_window': True}, 'use_sliding_window'),
    ({'hidden_act': 'gelu'}, "hidden_act='gelu'"),
])
def test_unsupported_config_names_the_key(update, message, hf_dirs):
  config = json.loads((hf_dirs('qwen2_gqa2_tied') / 'config.json').read_text())
  config.update(update)
  with pytest.raises(ValueError, match=message):
    hf_io.llama_config(config, 256, VOCAB)


def test_missing_shard_and_tensor_are_named(hf_dirs, tmp_path):
  src = hf_dirs('llama_3heads_tied_sharded')
  index = json.loads((src / 'model.safetensors.index.json').read_text())
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) > 1  # the fixture really is sharded
  for f in src.iterdir():
    if f.name != shards[-1]:
      (tmp_path / f.name).write_bytes(f.read_bytes())
  with pytest.raises(FileNotFoundError, match=shards[-1]):
    hf_io.load_llama(str(tmp_path))
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {}}))  # no shard at all
  with pytest.raises(KeyError, match='model.embed_tokens.weight is missing'):
    hf_io.load_llama(str(tmp_path))


def test_row_source_copies_rows(hf_dirs):
  base = hf_io.load_llama(str(hf_dirs('llama_gqa2_untied_llama3')))
  source = np.concatenate([np.arange(VOCAB), [7, 7]])  # two new tokens start as copies of row 7
  model = hf_io.load_llama(str(hf_dirs('llama_gqa2_untied_llama3')), row_source=source)
  assert (model.cfg.num_tokens, model.cfg.vocab_rows) == (VOCAB + 2, 256)
  for table, base_table in ((model.wte, base.wte), (model.lm_head, base.lm_head)):
    emb, base_emb = np.asarray(table.embedding.value), np.asarray(base_table.embedding.value)
    np.testing.assert_array_equal(emb[:VOCAB], base_emb[:VOCAB])
    np.testing.assert_array_equal(emb[VOCAB:VOCAB + 2], base_emb[[7, 7]])
    np.testing.assert_array_equal(emb[VOCAB + 2:], 0.0)


def test_rope_inv_freq_equals_transformers():
  for kind, scaling in (('llama3', LLAMA3), ('linear', {'rope_type': 'linear', 'factor': 4.0})):
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0, rope_scaling=scaling,
                                   max_position_embeddings=128)
    fn = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind]
    want = fn(cfg, 'cpu')[0].numpy()
    got = llama.rope_inv_freq(16, 500000.0, tuple(sorted(scaling.items())))
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=kind)



def test_dropout_masks_do_not_depend_on_how_the_sequence_is_split(hf_dirs):
  """With a `gpt2.Dropout` (COCONUT's training mode), one parallel pass equals a prefill plus a second chunk over
  the KV cache at the real positions: masks are keyed by sequence column, as GPT-2's."""
  dropout_cls = getattr(__import__('dtt_jax.model.gpt2', fromlist=['Dropout']), 'Dropout', None)
  if dropout_cls is None:
    pytest.skip('gpt2.Dropout is absent from this checkout')
  graphdef, state = nnx.split(hf_io.load_llama(str(hf_dirs('qwen2_3heads_1kv_untied'))))
  ids, mask = map(jnp.asarray, _batch())
  s, p = ids.shape[1], 7

  @jax.jit
  def hiddens(state, key):
    model = nnx.merge(graphdef, state)
    dropout = dropout_cls(key, 0.2, s)
    pos, x = positions_from_mask(mask), model.embed(ids)
    whole, _ = model(x, pos, causal_bias(mask), dropout=dropout)
    first, cache = model(x[:, :p], pos[:, :p], causal_bias(mask[:, :p]), llama.kv_cache(model.cfg, 3, p), 0,
                         dropout=dropout)
    rest, _ = model(x[:, p:], pos[:, p:], causal_bias(mask, s - p), cache.grow(s), p, dropout=dropout)
    plain, _ = model(x, pos, causal_bias(mask))
    return whole, jnp.concatenate([first, rest], 1), plain  # [B,S,D] each

  whole, pieces, plain = map(np.asarray, hiddens(state, jax.random.key(3)))  # threefry: rbg bits vary under vmap
  real = np.asarray(mask) > 0  # padded query rows attend to nothing: their values are not defined
  np.testing.assert_allclose(pieces[real], whole[real], atol=1e-5)
  assert np.abs(plain - whole)[real].max() > 1e-2  # the masks did act
