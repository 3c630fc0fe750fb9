"""Stage-1 samples and Stage-2 prompts (SPEC §2, §5): exact token layout and masks, filler statistics, fitting,
and a deterministic, resumable, multi-process batch iterator. A byte-level stand-in tokenizer makes these run
without ../shared/data; the last tests use the real GPT-2 tokenizer when it is there."""

import json
import logging

import jax
import numpy as np
import pytest

from dtt_jax import tokens
from dtt_jax.data import generators, samples
from dtt_jax.tokens import BOT_ID, EOS_ID, EOT_ID, SPECIAL_IDS, Tokenizer, Vocab

ALL_FIELDS = samples.BATCH_FIELDS


class ByteTokenizer:
  """Stand-in for the HF GPT-2 tokenizer: one id per UTF-8 byte (ids 0..255 are GPT-2 text tokens)."""

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    del add_special_tokens  # no bos / eos either way, as GPT-2's
    return list(text.encode('utf-8'))


def _bytes(text: str) -> list[int]:
  return list(text.encode('utf-8'))


RECORD = {'question': '1 + 2 =', 'steps': ['1+2=3 write 3'], 'answer': '3'}
NONE = samples.SampleConfig(max_prompt_len=12, max_completion_len=8, span='none', filler_prob=0.0)


def _batch(records, cfg, vocab=None, fillers=None):
  tok = Tokenizer(ByteTokenizer(), vocab or Vocab.full())
  enc = samples.encode_stage1(records, tok, cfg)
  rows = list(range(len(enc)))
  return samples.build_stage1_batch(enc, rows, fillers or [None] * len(rows), cfg, tok.vocab)


def test_empty_span_layout_and_masks():
  b = _batch([RECORD], NONE)
  prompt = _bytes('1 + 2 =\n')
  np.testing.assert_array_equal(b.prompt[0], [EOS_ID] * 4 + prompt)
  np.testing.assert_array_equal(b.prompt_mask[0], [0] * 4 + [1] * 8)
  np.testing.assert_array_equal(b.completion[0], [BOT_ID, EOT_ID, ord('3'), EOS_ID] + [EOS_ID] * 4)
  np.testing.assert_array_equal(b.completion_mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(b.loss_mask[0], b.completion_mask[0])
  np.testing.assert_array_equal(b.outer_mask[0], b.completion_mask[0])
  assert not b.inner_mask.any() and not b.filler_mask.any()
  assert all(b[k].dtype == np.int32 and b[k].shape == ((1, 12) if k.startswith('prompt') else (1, 8))
             for k in ALL_FIELDS)


def test_cot_span_layout_and_masks():
  cfg = samples.SampleConfig(12, 24, 'cot')
  record = dict(RECORD, steps=['1+2=3', 'w 3'])
  b = _batch([record], cfg)
  span = _bytes('1+2=3\nw 3')  # steps joined by STEP_SEPARATOR
  seq = [BOT_ID] + span + [EOT_ID, ord('3'), EOS_ID]
  np.testing.assert_array_equal(b.completion[0], seq + [EOS_ID] * (24 - len(seq)))
  inner = [0] + [1] * len(span) + [0] * (24 - 1 - len(span))
  np.testing.assert_array_equal(b.inner_mask[0], inner)
  np.testing.assert_array_equal(b.outer_mask[0], [1] + [0] * len(span) + [1, 1, 1] + [0] * (24 - len(seq)))
  np.testing.assert_array_equal(b.loss_mask[0], b.completion_mask[0])  # cot tokens are CE targets
  assert not b.filler_mask.any()


def test_filler_layout_and_masks():
  fill = np.array([7, 8, 9], np.int32)
  b = _batch([RECORD], samples.SampleConfig(12, 12, 'none', 0.15, 4), fillers=[fill])
  np.testing.assert_array_equal(b.completion[0, :7], [BOT_ID, 7, 8, 9, EOT_ID, ord('3'), EOS_ID])
  np.testing.assert_array_equal(b.filler_mask[0], [0, 1, 1, 1] + [0] * 8)
  np.testing.assert_array_equal(b.inner_mask[0], b.filler_mask[0])
  np.testing.assert_array_equal(b.loss_mask[0], [1, 0, 0, 0, 1, 1, 1] + [0] * 5)
  np.testing.assert_array_equal(b.outer_mask[0], [1, 0, 0, 0, 1, 1, 1] + [0] * 5)


def test_filler_draws_rate_lengths_and_tokens():
  cfg = samples.SampleConfig(span='none', filler_prob=0.15, max_filler=8)
  vocab = Vocab.compact([_bytes('0123456789 +=\n')])
  ids = samples.filler_token_ids(vocab)
  np.testing.assert_array_equal(ids, np.arange(len(SPECIAL_IDS), vocab.num_tokens))  # specials are 0..4
  draws = [samples.draw_filler(0, 0, i, cfg, ids) for i in range(8000)]
  fills = [d for d in draws if d is not None]
  assert abs(len(fills) / len(draws) - 0.15) < 0.015
  lengths = np.bincount([len(d) for d in fills], minlength=9)
  assert lengths[0] == 0 and lengths[1:].min() > 100  # 1..max_filler, each length drawn
  assert set(np.concatenate(fills).tolist()) == set(ids.tolist())  # any text token, never a special
  def key(d):
    return None if d is None else d.tolist()

  assert [key(d) for d in draws[:200]] == [key(samples.draw_filler(0, 0, i, cfg, ids)) for i in range(200)]
  assert [key(d) for d in draws[:200]] != [key(samples.draw_filler(0, 1, i, cfg, ids)) for i in range(200)]
  assert [key(d) for d in draws[:200]] != [key(samples.draw_filler(1, 0, i, cfg, ids)) for i in range(200)]
  assert samples.draw_filler(0, 0, 1, samples.SampleConfig(span='cot'), ids) is None
  full = samples.filler_token_ids(Vocab.full())
  assert full.shape == (EOS_ID,) and full.max() == EOS_ID - 1


def test_records_that_do_not_fit_are_dropped_and_counted(caplog):
  records = [RECORD, dict(RECORD, question='12345 + 67890 ='), dict(RECORD, answer='3' * 6)]
  tok = Tokenizer(ByteTokenizer(), Vocab.full())
  with caplog.at_level(logging.WARNING, logger='dtt_jax.data.samples'):
    enc = samples.encode_stage1(records, tok, samples.SampleConfig(12, 10, 'none', 0.15, 2))
  np.testing.assert_array_equal(enc.indices, [0])  # question 16 > 12 bytes; 3 + 6 + 2 filler > 10
  assert 'Dropped 2 of 3 records' in caplog.text
  with pytest.raises(ValueError, match=r'None of the 2 records fits: prompts need up to 16 tokens'):
    samples.encode_stage1(records[1:], tok, samples.SampleConfig(12, 10))


def test_compact_vocab_covers_every_text_and_the_specials():
  records = generators.generate_addition(50, 0)
  vocab = samples.compact_vocab(records, ByteTokenizer())
  texts = ''.join(t for r in records for t in samples.record_texts(r))
  assert vocab.gpt2_ids == tuple(SPECIAL_IDS) + tuple(sorted(set(_bytes(texts))))
  b = _batch(records, samples.SampleConfig(16, 64, 'cot'), vocab=vocab)
  assert b.completion.max() < vocab.num_tokens and (b.completion[:, 0] == vocab.bot).all()


def _iterator(records, batch_size=8, seed=0, cfg=None, **kw):
  tok = Tokenizer(ByteTokenizer(), Vocab.full())
  return samples.stage1_iterator(records, tok, cfg or samples.SampleConfig(16, 24, 'none', 0.5, 4), batch_size,
                                 seed=seed, **kw)


def _same(a, b) -> bool:
  return all(np.array_equal(a[k], b[k]) for k in ALL_FIELDS)


RECORDS = generators.generate_addition(40, seed=0)


def test_iterator_epochs_visit_every_example_once_in_a_seeded_order():
  it = _iterator(RECORDS)
  assert it.batches_per_epoch == 5
  seen = [it.global_rows(0, b) for b in range(5)]
  assert sorted(np.concatenate(seen).tolist()) == list(range(40))
  assert not np.array_equal(it.permutation(0), it.permutation(1))
  assert not np.array_equal(it.permutation(0), _iterator(RECORDS, seed=1).permutation(0))
  first = [next(it) for _ in range(12)]  # crosses two epoch boundaries
  again = _iterator(RECORDS)
  assert all(_same(a, next(again)) for a in first)
  assert it.state() == {'epoch': 2, 'batch': 2, 'seed': 0, 'num_examples': 40, 'batch_size': 8}


def test_filler_depends_on_seed_epoch_and_example_only():
  # batch sizes 4 and 8 visit the same example stream, so their rows must be identical, fillers included
  small, big = _iterator(RECORDS, batch_size=4), _iterator(RECORDS, batch_size=8)
  for _ in range(6):
    b = next(big)
    halves = [next(small), next(small)]
    assert all(np.array_equal(b[k], np.concatenate([h[k] for h in halves])) for k in ALL_FIELDS)
  assert b.filler_mask.any() and not b.filler_mask.all()


@pytest.mark.parametrize('skip', [3, 5, 11])
def test_restore_gives_the_batches_an_uninterrupted_run_gets(skip):
  it = _iterator(RECORDS)
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.state()))
  expected = [next(it) for _ in range(6)]
  resumed = _iterator(RECORDS)
  resumed.restore(state)
  assert all(_same(a, next(resumed)) for a in expected)


def test_restore_refuses_a_different_dataset_or_batch_size():
  state = _iterator(RECORDS).state()
  with pytest.raises(ValueError, match='num_examples=40'):
    _iterator(RECORDS[:32]).restore(state)
  with pytest.raises(ValueError, match='batch_size=8'):
    _iterator(RECORDS, batch_size=4).restore(state)
  with pytest.raises(ValueError, match='fewer than one batch'):
    _iterator(RECORDS[:4])


def test_processes_take_their_slices_of_each_global_batch():
  single = _iterator(RECORDS)
  procs = [_iterator(RECORDS, process_index=i, process_count=2) for i in range(2)]
  for _ in range(7):
    whole, parts = next(single), [next(p) for p in procs]
    assert parts[0].prompt.shape == (4, 16)
    assert all(np.array_equal(whole[k], np.concatenate([p[k] for p in parts])) for k in ALL_FIELDS)
  with pytest.raises(ValueError, match='divisible'):
    _iterator(RECORDS, batch_size=6, process_index=0, process_count=4)


def test_one_shot_batch_equals_the_iterators_rows():
  cfg = samples.SampleConfig(16, 24, 'none', 0.5, 4)
  tok = Tokenizer(ByteTokenizer(), Vocab.full())
  records = RECORDS[:10] + [dict(RECORD, question='9' * 20)]  # the last one does not fit and is left out
  whole = samples.stage1_batch(records, tok, cfg, seed=3)
  assert whole.prompt.shape == (10, 16) and whole.filler_mask.any()
  it = samples.stage1_iterator(records, tok, cfg, 10, seed=3)
  rows = it.global_rows(0, 0)
  batch = next(it)
  assert all(np.array_equal(batch[k], whole[k][rows]) for k in ALL_FIELDS)


def test_batch_is_a_pytree_with_the_train_step_fields():
  from dtt_jax.train import bootstrap  # pylint: disable=g-import-not-at-top
  b = next(_iterator(RECORDS))
  assert {k: b[k] for k in bootstrap.BATCH_FIELDS}.keys() == set(ALL_FIELDS)
  doubled = jax.tree.map(lambda x: x * 2, b)
  assert isinstance(doubled, samples.Stage1Batch) and np.array_equal(doubled.prompt, b.prompt * 2)


def test_prompts_are_left_padded_with_answers_and_indices(caplog):
  records = [RECORD, dict(RECORD, question='x' * 20, answer='9'), dict(RECORD, question='2 + 2 =', answer='4')]
  tok = Tokenizer(ByteTokenizer(), Vocab.full())
  with caplog.at_level(logging.WARNING, logger='dtt_jax.data.samples'):
    p = samples.build_prompts(records, tok, 10)
  assert 'Dropped 1 of 3' in caplog.text
  np.testing.assert_array_equal(p.prompt[1], [EOS_ID] * 2 + _bytes('2 + 2 =\n'))
  np.testing.assert_array_equal(p.prompt_mask[1], [0, 0] + [1] * 8)
  assert p.answers == ['3', '4'] and p.questions == ['1 + 2 =', '2 + 2 ='] and p.indices.tolist() == [0, 2]
  it = samples.prompt_iterator(RECORDS, tok, 16, 8, seed=2)
  first = next(it)
  assert len(first) == 8 and first.answers == [RECORDS[i]['answer'] for i in first.indices]
  state, expected = it.state(), next(it)
  again = samples.prompt_iterator(RECORDS, tok, 16, 8, seed=2)
  again.restore(state)
  assert next(again).indices.tolist() == expected.indices.tolist()


# ------------------------------------------------------------------------------------------------- real tokenizer

def test_real_tokenizer_round_trip(hf_tokenizer):
  records = generators.generate_addition(30, 0) + [
      {'question': 'Natalia sold 48 clips.', 'steps': ['<<48/2=24>>', '<<48+24=72>>'], 'answer': '72'}]
  for vocab in (Vocab.full(), samples.compact_vocab(records, hf_tokenizer)):
    tok = tokens.Tokenizer(hf_tokenizer, vocab)
    cfg = samples.SampleConfig(32, 64, 'cot')
    enc = samples.encode_stage1(records, tok, cfg)
    assert len(enc) == len(records)
    b = samples.build_stage1_batch(enc, range(len(enc)), [None] * len(enc), cfg, vocab)
    for i, r in enumerate(records):
      prompt = b.prompt[i][b.prompt_mask[i] == 1]
      completion = b.completion[i][b.completion_mask[i] == 1]
      assert tok.decode(prompt) == r['question'] + '\n'
      assert tok.decode(completion) == f'<|bot|>{chr(10).join(r["steps"])}<|eot|>{r["answer"]}<|endoftext|>'
      assert tok.decode(b.completion[i][b.inner_mask[i] == 1]) == '\n'.join(r['steps'])
