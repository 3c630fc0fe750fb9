"""The export's remote code (`model/modeling_dtt.py`) decodes with the gate as dtt_jax does: loaded with the Auto
classes only (`trust_remote_code=True`), `generate` gives dtt_jax's greedy tokens on 64 left-padded prompts and
per-position gates within 1e-4, latent positions included, for a GPT-2 with the projection (compact vocabulary),
an untied Qwen2 checkpoint with its own tokenizer (`tests/test_checkpoint_tokenizer.py`'s) and HRPO's gate;
`max_think` forces `<|eot|>` as the engine's budget does. Without remote code the same directory loads as the plain
trunk. Tiny random models, exported in-process."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from dtt_jax import data as data_lib
from dtt_jax import export, tokens
from dtt_jax.eval.evaluate import greedy_config
from dtt_jax.model import build_model
from dtt_jax.sampling import engine
from tests.test_checkpoint_tokenizer import _tiny_tokenizer

torch = pytest.importorskip('torch', reason='torch (CPU) loads the export: pip install -r requirements-dev.txt')
transformers = pytest.importorskip('transformers')

NEW_TOKENS = 12
NUM_PROMPTS = 64
TAU = 0.5
# name: (config.model overrides ('init': a tiny Qwen2 checkpoint with its tokenizer, `_qwen2_checkpoint`), the std of
# the trunk's random weight matrices: large enough that greedy tokens vary, small enough that float rounding does not
# grow along the recurrence (at 0.3, GPT-2's gates drifted apart by 1e-5 per 12 steps, Qwen2's by 1e-2))
CASES = {
    'gpt2_projection': (dict(use_projection=True), 0.2),
    'qwen2_untied': (dict(init='qwen2', vocab='full'), 0.15),
    'gpt2_hrpo': (dict(gate='hrpo'), 0.2),
}


@pytest.fixture(scope='module')
def records():
  return data_lib.get_dataset('addition', 'valid', size=200, seed=0, max_digits=3)


def _qwen2_checkpoint(path):
  """A tiny untied Qwen2 checkpoint (GQA: 2 kv heads) with a byte-level BPE tokenizer of its own, in `path`."""
  tok = _tiny_tokenizer()
  cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
  tok.save_pretrained(path)
  return str(path)


def _tiny_model(case: str, records, hf_tokenizer, tmp_path):
  """-> (a DTTModel of `case` with random weights, its dtt_jax tokenizer)."""
  cfg = base.get_config().model
  cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions = 2, 32, 2, 64
  overrides, trunk_std = CASES[case]
  cfg.update(overrides)
  if cfg.init == 'qwen2':
    cfg.init = _qwen2_checkpoint(tmp_path / 'qwen2')
    tokenizer = tokens.Tokenizer(tokens.load_tokenizer(cfg.init))
  else:
    tokenizer = tokens.Tokenizer(hf_tokenizer, data_lib.compact_vocab(records, hf_tokenizer))
  model = build_model(cfg, tokenizer.vocab, seed=3)
  # The trunk's weight matrices N(0, trunk_std^2), the gate's N(0, 0.1^2) (gate logits / tau of std ~1: gates spread
  # over (0, 1)), the projection I + N(0, 0.1^2),
  # biases N(0, 0.1^2); the HRPO lam from its init (a in [0.99, 0.999] at r = 1/2) shifted down: large latent weights.
  params = nnx.state(model, nnx.Param)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = []
  for i, (path, x) in enumerate(paths_leaves):
    name = jax.tree_util.keystr(path)
    noise = jax.random.normal(jax.random.key(i), x.shape)
    if 'lam' in name:
      leaves.append(x - 4.0)
    elif x.ndim >= 2 and name.startswith("['gpt2']"):
      leaves.append(trunk_std * noise)
    elif x.ndim >= 2:
      leaves.append(0.1 * noise + (np.eye(*x.shape) if 'proj' in name else 0.0))
    elif 'bias' in name:
      leaves.append(0.1 * noise)
    else:
      leaves.append(x)
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model, tokenizer


def _export(model, tokenizer, out_dir):
  export.write_export(model, tokenizer, str(out_dir), stage='grpo', eval_tau=TAU)
  return (transformers.AutoTokenizer.from_pretrained(out_dir),
          transformers.AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval())


def _hf_generate(hf_tok, hf_model, texts, **kwargs):
  hf_tok.padding_side = 'left'
  batch = hf_tok(texts, return_tensors='pt', padding=True)
  with torch.no_grad():
    out = hf_model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                            **kwargs)
  p = batch['input_ids'].shape[1]
  return batch, out.sequences[:, p:].numpy(), out.gates.numpy()


@pytest.mark.parametrize('case', list(CASES))
def test_remote_code_decodes_like_the_engine(case, records, hf_tokenizer, tmp_path):
  model, ours = _tiny_model(case, records, hf_tokenizer, tmp_path)
  vocab = ours.vocab
  out = tmp_path / 'export'
  hf_tok, hf_model = _export(model, ours, out)
  assert type(hf_model).__name__ == export.REMOTE_CLASSES[model.gpt2.cfg.family]

  prompts = data_lib.build_prompts(records[:NUM_PROMPTS], ours, max_prompt_len=16)
  texts = [data_lib.record_texts(records[i])[0] for i in prompts.indices]
  rollout = engine.generate(model, prompts.prompt, prompts.prompt_mask, jax.random.key(0), TAU,
                            greedy_config(vocab, NEW_TOKENS, max_think=0))
  ours_tokens, ours_gates = np.asarray(rollout.tokens), np.asarray(rollout.gates)
  real = np.asarray(rollout.mask) > 0
  batch, theirs, gates = _hf_generate(hf_tok, hf_model, texts)
  np.testing.assert_array_equal(batch['input_ids'].numpy()[batch['attention_mask'].numpy() > 0],
                                prompts.prompt[prompts.prompt_mask > 0])
  assert len(texts) == NUM_PROMPTS and len(set(ours_tokens[real].tolist())) > 10
  np.testing.assert_array_equal(np.where(real, theirs, -1), np.where(real, ours_tokens, -1))
  np.testing.assert_allclose(np.where(real, gates, 0), np.where(real, ours_gates, 0), atol=1e-4, rtol=0)
  assert (ours_gates[real] >= 0.5).sum() >= 100  # latent positions: the input mostly the previous hidden state

  # Without remote code the directory is the plain trunk (dtt_jax with the gate off), which decodes otherwise.
  plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(plain).__name__ == json.loads((out / 'config.json').read_text())['architectures'][0]
  with torch.no_grad():
    gate_off = plain.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[:, batch['input_ids'].shape[1]:]
  assert (np.where(real, gate_off.numpy(), -1) != np.where(real, theirs, -1)).any(1).sum() >= NUM_PROMPTS // 4


@pytest.mark.parametrize('pin_others', [False, True])
def test_max_think_and_a_pinned_gate_like_the_engine(records, hf_tokenizer, tmp_path, pin_others):
  """`generate(max_think=k)` (a LogitsProcessor) forces `<|eot|>` where the engine's `GenerateConfig.max_think`
  does, and a pinned token's gate is 1 as the engine's `pinned_id` makes it (`model.pin_latent` pins `<|latent|>`;
  here `<|bot|>`, which every row emits first: the model's <|bot|> row is aligned with the last prompt states),
  with `pin_others` (`model.pin_text`) every other gate 0."""
  model, ours = _tiny_model('gpt2_projection', records, hf_tokenizer, tmp_path)
  vocab = ours.vocab
  wte = model.gpt2.wte.embedding
  prompts = data_lib.build_prompts(records[:16], ours, max_prompt_len=16)
  last = np.asarray(engine.prefill(model, prompts.prompt, prompts.prompt_mask, 16).last_hidden).mean(0)
  wte[...] = wte[...].at[vocab.bot].set(20.0 * last / np.linalg.norm(last))
  export.write_export(model, ours, str(tmp_path), stage='grpo', eval_tau=TAU, pinned_id=vocab.bot,
                      pin_others=pin_others)
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
  texts = [data_lib.record_texts(records[i])[0] for i in prompts.indices]
  cfg = dataclasses.replace(greedy_config(vocab, NEW_TOKENS, max_think=3), pinned_id=vocab.bot,
                            pin_others=pin_others)
  rollout = engine.generate(model, prompts.prompt, prompts.prompt_mask, jax.random.key(0), TAU, cfg)
  ours_tokens, ours_gates, real = np.asarray(rollout.tokens), np.asarray(rollout.gates), np.asarray(rollout.mask) > 0
  assert (ours_tokens[:, 0] == vocab.bot).all() and (ours_tokens[:, 4] == vocab.eot).all()
  assert np.asarray(rollout.forced).sum() > 0 and (ours_gates[:, 0] == 1.0).all()
  _, theirs, gates = _hf_generate(hf_tok, hf_model, texts, max_think=3)
  np.testing.assert_array_equal(np.where(real, theirs, -1), np.where(real, ours_tokens, -1))
  np.testing.assert_allclose(np.where(real, gates, 0), np.where(real, ours_gates, 0), atol=1e-4, rtol=0)
  assert (gates[:, 0] == 1.0).all()
  opened = np.where(real & (ours_tokens != vocab.bot), ours_gates, 0)  # the unpinned tokens' gates
  assert (opened == 0.0).all() if pin_others else opened.max() > 0.01
