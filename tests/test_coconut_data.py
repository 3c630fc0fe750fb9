"""COCONUT layout: the latent replacement per curriculum stage (exact ids), the baselines, and the schedule."""

import numpy as np
import pytest

from dtt_jax import tokens
from dtt_jax.data import coconut

RECORD = {'question': '12 + 34 =', 'steps': ['2+4=6 write 6', '1+3=4 write 4'], 'answer': '46'}


@pytest.fixture(scope='module')
def tok(hf_tokenizer):
  return tokens.Tokenizer(hf_tokenizer, tokens.Vocab.full())


def _text(tok, *parts):
  return [int(i) for p in parts for i in tok.encode(p)]


def _expected(tok, thoughts, thought_id, remaining):
  v = tok.vocab
  head = [v.bot] + [thought_id] * thoughts + [v.eot]
  tail = _text(tok, *[s + '\n' for s in remaining], '### 46') + [v.eos]
  return head, tail


@pytest.mark.parametrize('c', [1, 2])
@pytest.mark.parametrize('stage', [0, 1, 2, 3, 6])
def test_coconut_replaces_the_first_k_steps_by_kc_latents(tok, c, stage):
  """Stage k: k*c <|latent|> between <|bot|> and <|eot|>, then the remaining steps; a record with fewer steps
  than k has all of them replaced by (its number of steps)*c latents. Loss on the text after <|eot|> only;
  latent_mask exactly on the latents."""
  cfg = coconut.Curriculum(c_thoughts=c)
  sample = coconut.build_sample(RECORD, 'coconut', stage, cfg, tok)
  replaced = min(stage, 2)
  head, tail = _expected(tok, replaced * c, tok.vocab.latent, RECORD['steps'][replaced:])
  assert sample.prompt.tolist() == _text(tok, '12 + 34 =\n')
  assert sample.completion.tolist() == head + tail
  assert sample.loss_mask.tolist() == [0] * len(head) + [1] * len(tail)
  assert sample.latent_mask.tolist() == [0] + [1] * (replaced * c) + [0] * (1 + len(tail))


def test_pause_as_thought_uses_pause_tokens_and_no_latent_inputs(tok):
  sample = coconut.build_sample(RECORD, 'pause_as_thought', 1, coconut.Curriculum(c_thoughts=2), tok)
  head, tail = _expected(tok, 2, tok.vocab.pause, RECORD['steps'][1:])
  assert sample.completion.tolist() == head + tail
  assert sample.latent_mask.sum() == 0 and sample.loss_mask.tolist() == [0] * len(head) + [1] * len(tail)


@pytest.mark.parametrize('method,head_len,body', [
    ('cot', 0, ['2+4=6 write 6\n', '1+3=4 write 4\n']), ('no_cot', 0, []), ('pause', 6, [])])
def test_baselines_ignore_the_stage(tok, method, head_len, body):
  """CoT keeps every step, No-CoT none, Pause puts max_stage * c pause tokens before the answer; the stage does not
  change them; the loss covers everything after the head."""
  cfg = coconut.Curriculum(c_thoughts=1, max_stage=6)
  samples = [coconut.build_sample(RECORD, method, k, cfg, tok) for k in (0, 3, 6)]
  tail = _text(tok, *body, '### 46') + [tok.vocab.eos]
  for s in samples:
    assert s.completion.tolist() == [tok.vocab.pause] * head_len + tail
    assert s.loss_mask.tolist() == [0] * head_len + [1] * len(tail)
    assert s.latent_mask.sum() == 0


def test_curriculum_schedule_and_optimizer_resets():
  """k = epoch // epochs_per_stage capped at max_stage (ProsQA: c=1, 6 stages of 5 epochs); the optimizer resets
  where the stage changes; without a curriculum every epoch is at the last stage and nothing resets."""
  cfg = coconut.Curriculum(c_thoughts=1, max_stage=6, epochs_per_stage=5)
  assert [cfg.stage(e) for e in range(0, 40, 5)] == [0, 1, 2, 3, 4, 5, 6, 6]
  assert [cfg.stage(e) for e in (4, 5, 9, 10)] == [0, 1, 1, 2]
  assert cfg.stage_at_step(49, steps_per_epoch=10) == 0 and cfg.stage_at_step(50, steps_per_epoch=10) == 1
  assert cfg.stage_starts(steps_per_epoch=10, total_steps=400) == [50, 100, 150, 200, 250, 300]
  flat = coconut.Curriculum(max_stage=3, curriculum=False)
  assert {flat.stage(e) for e in range(20)} == {3} and flat.stage_starts(10, 200) == []
  gsm8k = coconut.Curriculum(c_thoughts=2, max_stage=3, epochs_per_stage=3)
  assert [gsm8k.stage(e) for e in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_bad_values_name_their_key(tok):
  with pytest.raises(ValueError, match='config.coconut.c_thoughts=0 must be >= 1'):
    coconut.Curriculum(c_thoughts=0)
  with pytest.raises(ValueError, match="config.method='latent'"):
    coconut.build_sample(RECORD, 'latent', 0, coconut.Curriculum(), tok)
