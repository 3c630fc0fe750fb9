"""Tokenizer ids equal tiktoken's GPT-2 encoding; DTT specials have fixed ids; the compact vocabulary round-trips."""

import json

import numpy as np
import pytest

from dtt_jax import tokens
from tests.conftest import require_shared


def _tiktoken_gpt2():
  tiktoken = pytest.importorskip('tiktoken', reason='tiktoken is the reference encoder (requirements-dev.txt)')
  from tiktoken.load import data_gym_to_mergeable_bpe_ranks
  d = require_shared('gpt2_tokenizer')
  ranks = data_gym_to_mergeable_bpe_ranks(str(d / 'vocab.bpe'), str(d / 'encoder.json'))
  return tiktoken.Encoding(
      'gpt2', pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
      mergeable_ranks=ranks, special_tokens={tokens.EOS: tokens.EOS_ID})


def _real_texts():
  texts = []
  with open(require_shared('gsm8k', 'openai_grade_school_math', 'train.jsonl')) as f:
    for _, line in zip(range(200), f):
      record = json.loads(line)
      texts += [record['question'], record['answer']]
  for name in ('prontoqa/prontoqa_valid.json', 'prosqa/prosqa_valid.json'):
    with open(require_shared(*name.split('/'))) as f:
      for record in json.load(f)[:100]:
        texts += [record['question'], ' '.join(record['steps']), record['answer']]
  return texts


def test_ids_equal_tiktoken_on_real_text(hf_tokenizer):
  enc = _tiktoken_gpt2()
  texts = _real_texts()
  assert len(texts) > 500
  for text in texts:
    assert hf_tokenizer.encode(text) == enc.encode(text, allowed_special=set()), text


def test_special_token_ids(hf_tokenizer):
  ids = hf_tokenizer.encode('Q?\n<|bot|> x<|eot|> 5<|endoftext|><|latent|><|pause|>')
  assert ids == [48, 30, 198, 50257, 2124, 50258, 642, 50256, 50259, 50260]
  assert hf_tokenizer.convert_tokens_to_ids('<<') == tokens.COPY_EMBEDDING_FROM_ID
  assert len(hf_tokenizer) == tokens.GPT2_VOCAB


def test_compact_vocab_round_trip(hf_tokenizer):
  text = 'Every cat is a dog.\n<|bot|> 7+5=12<|eot|> True<|endoftext|>'
  vocab = tokens.Vocab.compact([hf_tokenizer.encode(text)])
  tok = tokens.Tokenizer(hf_tokenizer, vocab)
  ids = tok.encode(text)
  assert ids.max() < vocab.num_tokens and vocab.num_rows == 128
  assert (vocab.eos, vocab.bot, vocab.eot, vocab.latent, vocab.pause) == (0, 1, 2, 3, 4)
  assert tok.decode(ids) == text
  assert tokens.Vocab.from_json(vocab.to_json()) == vocab
  with pytest.raises(KeyError, match='not in the compact vocabulary'):
    tok.encode('Zebra')


def test_full_vocab_is_identity(hf_tokenizer):
  tok = tokens.Tokenizer(hf_tokenizer)
  ids = tok.encode('Hello <|bot|>')
  np.testing.assert_array_equal(ids, hf_tokenizer.encode('Hello <|bot|>'))
  assert tok.vocab.num_rows == 50304 and tok.vocab.bot == tokens.BOT_ID


def test_bad_tokenizer_dir_is_explained(tmp_path):
  with pytest.raises(OSError, match='Cannot load a tokenizer from .*: the directory has neither'):
    tokens.load_tokenizer(str(tmp_path))
