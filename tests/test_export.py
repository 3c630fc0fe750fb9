"""The export is usable with transformers as is: `AutoTokenizer` gives the model's ids (compact or full vocabulary)
for the dataset's text, and `AutoModelForCausalLM` greedy-decodes a prompt to the tokens dtt_jax decodes with the
gate off. Tiny random models, exported in-process (no training run)."""

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
from tests.conftest import require_shared

torch = pytest.importorskip('torch', reason='torch (CPU) loads the export: pip install -r requirements-dev.txt')
transformers = pytest.importorskip('transformers')

NEW_TOKENS = 12


def _records(name: str) -> list[dict]:
  if name == 'addition':
    return data_lib.get_dataset('addition', 'valid', size=200, seed=0, max_digits=3)
  return data_lib.get_dataset(name, 'valid', data_dir=None)  # ../shared/data (skipped by the caller when absent)


def _saved_tokenizer(hf_tokenizer, vocab, tmp_path):
  """The export's tokenizer, written and read back with AutoTokenizer."""
  tokens.hf_tokenizer_for_vocab(hf_tokenizer, vocab).save_pretrained(tmp_path)
  return transformers.AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize('dataset', ['addition', 'gsm8k'])
def test_compact_tokenizer_gives_dtt_jax_ids_on_dataset_text(dataset, hf_tokenizer, tmp_path):
  """Every question, step and answer text of the dataset (the texts the compact vocabulary is built from) encodes to
  exactly `Tokenizer.encode`'s model ids, and decodes back; the specials have the compact ids 0..4; a token outside
  the vocabulary gets an id >= num_tokens where dtt_jax raises KeyError."""
  if dataset == 'gsm8k':
    require_shared('gsm8k')
  records = _records(dataset)
  vocab = data_lib.compact_vocab(records, hf_tokenizer)
  ours = tokens.Tokenizer(hf_tokenizer, vocab)
  exported = _saved_tokenizer(hf_tokenizer, vocab, tmp_path)
  texts = [t for r in records for t in data_lib.record_texts(r) if t]
  assert len(texts) > 300
  for text in texts:
    ids = exported.encode(text)
    assert ids == ours.encode(text).tolist(), text
    assert exported.decode(ids) == text
  marked = texts[0] + tokens.BOT + texts[1] + tokens.EOT + texts[2] + tokens.EOS
  assert exported.encode(marked) == ours.encode(marked).tolist()
  assert exported.convert_tokens_to_ids([tokens.EOS, *tokens.SPECIAL_TOKENS]) == [0, 1, 2, 3, 4]
  assert (exported.eos_token_id, exported.pad_token_id, exported.bos_token_id) == (0, 0, 0)
  assert set(tokens.SPECIAL_TOKENS) <= set(exported.all_special_tokens)
  outside = ' Zanzibar quokka'
  with pytest.raises(KeyError):
    ours.encode(outside)
  assert max(exported.encode(outside)) >= vocab.num_tokens
  assert exported.decode(exported.encode(outside)) == outside


def test_full_vocab_tokenizer_is_gpt2_with_specials(hf_tokenizer, tmp_path):
  """Full vocabulary: the exported tokenizer's ids are GPT-2's, the DTT specials at 50257..50260."""
  exported = _saved_tokenizer(hf_tokenizer, tokens.Vocab.full(), tmp_path)
  text = 'Natalia sold clips to 48 friends.\n' + tokens.BOT + ' <<48/2=24>>' + tokens.EOT + ' 72' + tokens.EOS
  assert exported.encode(text) == hf_tokenizer.encode(text)
  assert exported.convert_tokens_to_ids(list(tokens.SPECIAL_TOKENS)) == list(tokens.SPECIAL_IDS[1:])
  assert exported.eos_token_id == tokens.EOS_ID and len(exported) == tokens.GPT2_VOCAB


def _tiny_model(vocab):
  cfg = base.get_config().model
  cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions = 2, 32, 2, 64
  model = build_model(cfg, vocab, seed=3)
  # Weight matrices N(0, 0.5^2) instead of the 0.02 init: at 0.02 a random model repeats one token; here the greedy
  # tokens vary and the top-2 logit gaps (>= 6e-3 on these prompts) dwarf the XLA/torch rounding differences.
  params = nnx.state(model.gpt2, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  leaves = [x if x.ndim < 2 else 0.5 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
  nnx.update(model.gpt2, jax.tree.unflatten(treedef, leaves))
  # Gate off: g = sigmoid(-1e9 / tau) = 0, the input is the token embedding: plain GPT-2 decoding.
  nnx.update(model.gate_head, {'bias': np.full((1,), -1e9, np.float32)})
  return model


@pytest.mark.parametrize('vocab_kind', ['compact', 'full'])
def test_export_loads_with_auto_classes_and_greedy_decodes_like_dtt_jax(vocab_kind, hf_tokenizer, tmp_path):
  """AutoTokenizer encodes the prompts to dtt_jax's prompt ids; AutoModelForCausalLM greedy-decodes each to dtt_jax's
  greedy tokens (gate off); config.json's bos/eos/pad ids are the model's <|endoftext|> row, inside vocab_size."""
  records = _records('addition')
  vocab = data_lib.compact_vocab(records, hf_tokenizer) if vocab_kind == 'compact' else tokens.Vocab.full()
  ours = tokens.Tokenizer(hf_tokenizer, vocab)
  model = _tiny_model(vocab)
  export.write_export(model, ours, str(tmp_path), stage='bootstrap', eval_tau=1.0)

  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['vocab_size'] == vocab.num_tokens
  assert config['eos_token_id'] == config['bos_token_id'] == config['pad_token_id'] == vocab.eos
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert hf_model.config.eos_token_id == hf_tok.eos_token_id == vocab.eos

  prompts = data_lib.build_prompts(records[:4], ours, max_prompt_len=16)
  rollout = engine.generate(model, prompts.prompt, prompts.prompt_mask, jax.random.key(0), 1.0,
                            greedy_config(vocab, NEW_TOKENS, max_think=0))
  assert float(np.max(np.asarray(rollout.gates))) == 0.0
  ours_tokens = np.asarray(rollout.tokens)
  ours_mask = np.asarray(rollout.mask)
  assert len(set(ours_tokens[ours_mask > 0].tolist())) > 3  # the comparison is not of one repeated token
  for i, index in enumerate(prompts.indices):
    text = data_lib.record_texts(records[index])[0]
    ids = hf_tok(text, return_tensors='pt')
    assert ids['input_ids'][0].tolist() == prompts.prompt[i][prompts.prompt_mask[i] > 0].tolist()
    with torch.no_grad():
      out = hf_model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    theirs = out[0, ids['input_ids'].shape[1]:].tolist()
    assert theirs == ours_tokens[i][ours_mask[i] > 0].tolist(), text
