"""COCONUT's missing Table-1 baselines over training: "w/o thought" (COCONUT's stage schedule removing steps, no
thought, no marker) and iCoT (stepwise internalization: CoT tokens removed from the front on a schedule, with
removal smoothing and an optimizer reset at each removal), as exact token layouts at several steps, against the
official code's schedule replayed step by step; and the configs that run them on the suite datasets."""

import collections
import math

import numpy as np
import pytest

from dtt_jax import tokens
from dtt_jax.data import coconut, generators

RECORDS = [generators.addition_record(a, b) for a, b in [(12, 34), (5, 7), (40, 25), (99, 1)]]
# 12 + 34 =: '2+4=6 write 6\n' '1+3=4 write 4\n' (8 + 8 tokens); 99 + 1 =: 3 steps, 27 tokens (the longest)


@pytest.fixture(scope='module')
def tok(hf_tokenizer):
  return tokens.Tokenizer(hf_tokenizer, tokens.Vocab.full())


def _text(tok, *parts):
  return [int(i) for p in parts for i in tok.encode(p)]


def _cot(tok, record):
  return _text(tok, *[s + '\n' for s in record['steps']])


def _batches(tok, method, cfg, **kw):
  args = dict(records=RECORDS, method=method, cfg=cfg, tokenizer=tok, batch_size=2, max_prompt_len=8,
              max_completion_len=48, steps_per_epoch=4, seed=3)
  args.update(kw)
  return coconut.CurriculumBatches(**args)


def _rows(tok, batch):
  """[(record, completion ids, loss mask)] of a batch's rows, the record found by its prompt."""
  by_question = {r['question'] + '\n': r for r in RECORDS}
  out = []
  for i in range(batch['prompt'].shape[0]):
    record = by_question[tok.decode(batch['prompt'][i][batch['prompt_mask'][i] > 0])]
    n = int(batch['loss_mask'][i].sum())
    assert batch['latent_mask'][i].sum() == 0
    out.append((record, batch['completion'][i][:n].tolist(), batch['loss_mask'][i][:n].tolist()))
  return out


# ------------------------------------------------------------------------------------------ COCONUT w/o thought

@pytest.mark.parametrize('stage,kept', [(0, 2), (1, 1), (2, 0), (3, 0), (7, 0)])
def test_no_thought_removes_the_first_k_steps_and_adds_nothing(tok, stage, kept):
  """Official `no_thoughts: True` (c_thought = 0, no special marker): stage k keeps steps[k:] as text with no
  <|bot|>, thought or <|eot|> (the No-CoT layout from stage 2 of a 2-step record, and past K); the loss covers the
  whole completion; evaluation forces nothing."""
  cfg = coconut.Curriculum(c_thoughts=2, max_stage=3)
  record = RECORDS[0]
  sample = coconut.build_sample(record, 'coconut_no_thought', stage, cfg, tok)
  want = _text(tok, *[s + '\n' for s in record['steps'][2 - kept:]], '### 46') + [tok.vocab.eos]
  assert sample.prompt.tolist() == _text(tok, '12 + 34 =\n')
  assert sample.completion.tolist() == want and sample.loss_mask.tolist() == [1] * len(want)
  assert sample.latent_mask.sum() == 0
  assert coconut.head_tokens('coconut_no_thought', stage, cfg, tok.vocab) == []
  if kept == 0:
    assert want == coconut.build_sample(record, 'no_cot', stage, cfg, tok).completion.tolist()


def test_no_thought_follows_coconuts_schedule_and_resets(tok):
  """Batches over training: step s at stage s // 4 (one epoch of 4 steps per stage, K = 2, then the final stage),
  each row exactly `steps[k:]` + answer; stage changes and optimizer resets at COCONUT's steps."""
  cfg = coconut.Curriculum(c_thoughts=1, max_stage=2, epochs_per_stage=1)
  batches, reference = _batches(tok, 'coconut_no_thought', cfg), _batches(tok, 'coconut', cfg)
  for step in range(16):
    stage = step // 4 if step < 12 else 3
    assert batches.stage(step) == stage
    for record, completion, loss in _rows(tok, next(batches)):
      steps = record['steps'][stage:] if stage <= 2 else []
      want = _text(tok, *[s + '\n' for s in steps], '### ' + record['answer']) + [tok.vocab.eos]
      assert completion == want and loss == [1] * len(want), (step, record['question'])
  assert batches.stage_starts(24) == reference.stage_starts(24) == [4, 8, 12]
  for every in (0, 1, 2):
    assert batches.reset_steps(24, every) == reference.reset_steps(24, every) == cfg.reset_steps(4, 24, every)


# ------------------------------------------------------------------------------------------ iCoT

def _official_schedule(steps_per_epoch, epochs, remove_per_epoch, pretrain_epochs=0, beyond=math.inf):
  """The official train.py's `scheduled_to_remove` at each batch (inf: all) and the batches where it resets the
  optimizer (its counter logic, `--reset_optimizer`, `--remove_all_when_remove_beyond`, remove_start_from 0),
  replayed."""
  scheduled, counter, removed, resets = 0, 0, [], []
  per_token = int(round(steps_per_epoch / remove_per_epoch))
  for epoch in range(epochs):
    for _ in range(steps_per_epoch):
      previous = scheduled
      if counter == per_token or per_token == 0:
        scheduled, counter = scheduled + 1, 0
      if epoch >= pretrain_epochs:
        counter += 1
      if scheduled > previous:
        resets.append(len(removed))
      if scheduled >= beyond:
        scheduled = math.inf
      removed.append(scheduled)
  return removed, resets


@pytest.mark.parametrize('steps_per_epoch,delta,pretrain,beyond', [
    (100, 8, 0, 0), (25, 8, 0, 0), (25, 25, 0, 0), (10, 3, 2, 0), (100, 7.142857142857143, 0, 0), (25, 8, 0, 5)])
def test_icot_removal_schedule_is_the_official_one(steps_per_epoch, delta, pretrain, beyond):
  """Tokens scheduled for removal at every step and the reset steps equal the official loop's, replayed: one more
  every round(steps_per_epoch / delta) steps after the pretrain epochs (8 per 100-step epoch: every 12 steps), all
  from `beyond` on."""
  cfg = coconut.Curriculum(icot_delta=delta, icot_pretrain_epochs=pretrain, icot_remove_all_beyond=beyond)
  removed, resets = _official_schedule(steps_per_epoch, 6, delta, pretrain, beyond or math.inf)
  removed = [coconut.ALL_REMOVED if r == math.inf else r for r in removed]
  assert [cfg.removed_at_step(s, steps_per_epoch) for s in range(len(removed))] == removed
  assert [s for s in range(1, len(removed)) if removed[s] != removed[s - 1]] == resets
  if (steps_per_epoch, delta) == (100, 8):
    assert cfg.removal_interval(100) == 12 and removed[:37:12] == [0, 1, 2, 3] and removed[100] == 8
  assert cfg.removal_end(5, steps_per_epoch) == removed.index(5 if not beyond else coconut.ALL_REMOVED)
  assert cfg.removal_end(4, steps_per_epoch) == removed.index(4)


def test_icot_schedule_resumed_into_the_run():
  """`start_epoch` counts the epochs before the run: step 0 of a run starting at epoch 2 removes what epoch 2
  does (2 delta when delta divides the epoch)."""
  cfg = coconut.Curriculum(icot_delta=5, start_epoch=2)
  assert cfg.removal_interval(20) == 4 and [cfg.removed_at_step(s, 20) for s in (0, 3, 4, 20)] == [10, 10, 11, 15]
  assert cfg.removal_end(12, 20) == 8 and cfg.removal_end(3, 20) == 0


def test_icot_smoothing_draws_the_official_distribution():
  """o ~ P(o) = (1 - e^-lambda) e^(-lambda o), truncated at 99 with the tail's mass on 99 (the official
  `compute_lambda_distribution`): the frequencies of 20000 draws at lambda = 1 within 4 standard errors, the
  tail at lambda = 0.01; the same (seed, step, record) draws the same o; lambda = inf and the pretrain epochs
  draw none. Fixed draws (seed 3) pin the generator."""
  cfg = coconut.Curriculum(icot_lambda=1.0)
  draws = [cfg.removal_offset(3, step, record, 100) for step in range(2000) for record in range(10)]
  counts = collections.Counter(draws)
  for o in range(4):
    p = (1 - math.exp(-1)) * math.exp(-o)
    assert abs(counts[o] / len(draws) - p) < 4 * math.sqrt(p * (1 - p) / len(draws)), o
  assert draws[:12] == [0, 1, 0, 0, 0, 1, 1, 0, 2, 1, 0, 1]
  assert [cfg.removal_offset(3, 7, 1, 100) for _ in range(3)] == [draws[71]] * 3
  flat = coconut.Curriculum(icot_lambda=0.01)
  tail = [flat.removal_offset(0, 0, r, 100) for r in range(4000)]
  assert max(tail) == coconut.MAX_REMOVAL_OFFSET and abs(np.mean(np.array(tail) == 99) - math.exp(-0.99)) < 0.03
  assert {coconut.Curriculum(icot_lambda=math.inf).removal_offset(0, s, 1, 10) for s in range(50)} == {0}
  assert {coconut.Curriculum(icot_lambda=0.01, icot_pretrain_epochs=2).removal_offset(0, s, 1, 10)
          for s in range(20)} == {0}
  with pytest.raises(ValueError, match='config.coconut.icot_lambda=0 must be > 0'):
    coconut.Curriculum(icot_lambda=0)


@pytest.mark.parametrize('removed,text', [
    (0, '2+4=6 write 6\n1+3=4 write 4\n### 46'), (3, '=6 write 6\n1+3=4 write 4\n### 46'),
    (8, '1+3=4 write 4\n### 46'), (15, '\n### 46'), (16, '### 46'), (40, '### 46')])
def test_icot_removes_cot_tokens_from_the_front(tok, removed, text):
  """Stage r of iCoT: the concatenated step tokens without their first r (a step can be cut inside), then the
  answer; everything after the question is in the loss; no head at evaluation. r past the CoT is No-CoT."""
  cfg = coconut.Curriculum()
  sample = coconut.build_sample(RECORDS[0], 'icot', removed, cfg, tok)
  assert sample.completion.tolist() == _cot(tok, RECORDS[0])[removed:] + _text(tok, '### 46') + [tok.vocab.eos]
  assert tok.decode(sample.completion) == text + '<|endoftext|>'
  assert sample.loss_mask.tolist() == [1] * len(sample.completion) and sample.latent_mask.sum() == 0
  assert coconut.head_tokens('icot', removed, cfg, tok.vocab) == []
  if removed >= 16:
    assert sample.completion.tolist() == coconut.build_sample(RECORDS[0], 'no_cot', 0, cfg, tok).completion.tolist()


def test_icot_batches_over_training_without_smoothing(tok):
  """lambda = inf: every row of step s removes s // 2 tokens (delta 2 per 4-step epoch), until the longest CoT
  (99 + 1: 27 tokens) is gone at step 54; the stage stops there, so do the resets (every removal before it). With
  `icot_remove_all_beyond` = 10 everything goes at step 20, the last reset."""
  cfg = coconut.Curriculum(icot_delta=2, icot_lambda=math.inf)
  batches = _batches(tok, 'icot', cfg)
  assert batches.cot_tokens == 27 and cfg.removal_end(27, 4) == 54
  for step in range(60):
    removed = min(step // 2, 27)
    assert batches.stage(step) == removed
    for record, completion, _ in _rows(tok, next(batches)):
      cot = _cot(tok, record)
      assert completion == cot[removed:] + _text(tok, '### ' + record['answer']) + [tok.vocab.eos], step
  assert batches.stage_starts(100) == batches.reset_steps(100, every_epochs=1) == list(range(2, 55, 2))
  assert batches.reset_steps(100, every_epochs=0) == []
  cut = _batches(tok, 'icot', coconut.Curriculum(icot_delta=2, icot_lambda=math.inf, icot_remove_all_beyond=10))
  assert [cut.stage(s) for s in (19, 20, 99)] == [9, 27, 27] and cut.reset_steps(100, 1) == list(range(2, 21, 2))
  for _ in range(21):
    batch = next(cut)
  for record, completion, _ in _rows(tok, batch):  # step 20: No-CoT
    assert completion == _text(tok, '### ' + record['answer']) + [tok.vocab.eos]


def test_icot_batches_with_smoothing_are_pinned_and_resume_exactly(tok):
  """lambda = 1, seed 3: each row removes the scheduled r plus its own draw o(seed, step, record) (pinned here);
  state() / restore() in the middle continues with the same rows, draws and layouts."""
  cfg = coconut.Curriculum(icot_delta=2, icot_lambda=1.0)
  batches = _batches(tok, 'icot', cfg)
  seen = [next(batches) for _ in range(10)]
  removed = []
  for step, batch in enumerate(seen):
    for record, completion, _ in _rows(tok, batch):
      cut = len(_cot(tok, record)) + len(_text(tok, '### ' + record['answer'])) + 1 - len(completion)
      assert completion == coconut.build_sample(record, 'icot', cut, cfg, tok).completion.tolist()
      assert cut == step // 2 + cfg.removal_offset(3, step, RECORDS.index(record), 4)
      removed.append((RECORDS.index(record), cut - step // 2))
  assert removed == [(3, 0), (2, 0), (1, 1), (0, 0), (0, 0), (1, 1), (2, 0), (3, 0), (0, 2), (3, 1),  # (record, o)
                     (2, 4), (1, 0), (1, 1), (2, 0), (0, 1), (3, 0), (2, 1), (0, 0), (3, 1), (1, 2)]
  partial, resumed = _batches(tok, 'icot', cfg), _batches(tok, 'icot', cfg)
  for _ in range(6):
    next(partial)
  resumed.restore(partial.state())
  for want in seen[6:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------ configs

def test_baseline_configs():
  """`configs/coconut.py:<dataset>,coconut_no_thought|icot` at both scales: w/o thought starts where COCONUT does
  (GSM8K: epoch 3, from a CoT run); iCoT from epoch 0 with the official delta 8 and lambda 4 at paper scale, and
  at tiny scale every CoT of the training set gone when the final stage of the others starts."""
  from configs import coconut as coconut_configs  # pylint: disable=g-import-not-at-top
  from dtt_jax.train import coconut as coconut_train  # pylint: disable=g-import-not-at-top

  c = coconut_configs.get_config('gsm8k,coconut_no_thought,paper')
  assert (c.method, c.coconut.start_epoch) == ('coconut_no_thought', 3) and coconut_train.follows_curriculum(c)
  c = coconut_configs.get_config('gsm8k,icot,paper')
  assert (c.method, c.coconut.start_epoch, c.coconut.icot_delta, c.coconut.icot_lambda) == ('icot', 0, 8.0, 4.0)
  assert not coconut_train.follows_curriculum(c)
  for dataset in coconut_configs.DATASETS:
    c = coconut_configs.get_config(f'{dataset},icot')
    cfg = coconut.Curriculum.from_config(c.coconut)
    assert (cfg.icot_delta, cfg.icot_lambda) == (c.coconut.icot_delta, 4.0)
    end = cfg.removal_end(coconut_configs.ICOT_LONGEST[dataset], c.coconut.steps_per_epoch)
    assert end <= cfg.last_stage_start(c.coconut.steps_per_epoch), dataset
    with pytest.raises(ValueError, match='config.method="icot": the curriculum .* lacks config.coconut.icot_'):
      coconut_train.check_config(c, coconut.Curriculum(1, c.coconut.max_stage, 1))
    coconut_train.check_config(c, cfg)


@pytest.mark.parametrize('dataset', ['addition2', 'addition3', 'addition4', 'prosqa_mini'])
def test_suite_configs_fit_their_records(tok, dataset):
  """`configs/coconut.py:addition<n>`: both operands exactly n digits, K = n + 1 (every step latent at the final
  stage), and every layout of every method fits the configured lengths (nothing dropped, the longest problem
  included); `prosqa_mini`: N = 6, K = 3, the longest CoT as `ICOT_LONGEST` says, nothing dropped."""
  from configs import coconut as coconut_configs  # pylint: disable=g-import-not-at-top
  from dtt_jax.data import loaders  # pylint: disable=g-import-not-at-top

  c = coconut_configs.get_config(f'{dataset},cot')
  d = c.dataset
  records = loaders.get_dataset(d.name, 'train', size=300, min_digits=d.min_digits, max_digits=d.max_digits)
  if dataset == 'prosqa_mini':
    assert (d.name, c.coconut.max_stage, generators.PROSQA_MINI_NODES) == ('prosqa_mini', 3, 6)
    assert max(len(_cot(tok, r)) for r in records) <= coconut_configs.ICOT_LONGEST[dataset]
  else:
    digits = int(dataset[-1])
    assert (d.name, d.min_digits, d.max_digits, c.coconut.max_stage) == ('addition', digits, digits, digits + 1)
    records += [generators.addition_record(10 ** digits - 1, 10 ** digits - 1)]  # the longest: a carry everywhere
    assert {len(r['question'].split()[0]) for r in records} == {digits}
    assert max(len(_cot(tok, r)) for r in records) == coconut_configs.ICOT_LONGEST[dataset]
  cfg = coconut.Curriculum.from_config(c.coconut)
  for method in coconut.METHODS:
    kept = coconut.fitting_records(records, method, cfg, tok, c.data.max_prompt_len, c.data.max_completion_len)
    assert len(kept) == len(records), method
