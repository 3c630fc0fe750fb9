"""COCONUT: the latent replacement per curriculum stage (exact ids), the baselines, the schedule, and the loss
through the engine against COCONUT's n + 1 passes."""

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
@pytest.mark.parametrize('stage', [0, 1, 2, 3, 6, 7])
def test_coconut_replaces_the_first_k_steps_by_kc_latents(tok, c, stage):
  """Stage k <= K: k*c <|latent|> between <|bot|> and <|eot|>, then steps[k:] (a record with fewer steps than k
  loses all of them and still gets k*c latents, COCONUT's pad_latent_to_max); stage K + 1: K*c latents, no step.
  Loss on the text after <|eot|> only; latent_mask exactly on the latents."""
  cfg = coconut.Curriculum(c_thoughts=c, max_stage=6)
  sample = coconut.build_sample(RECORD, 'coconut', stage, cfg, tok)
  thoughts = min(stage, 6) * c
  head, tail = _expected(tok, thoughts, tok.vocab.latent, RECORD['steps'][stage:] if stage <= 6 else [])
  assert sample.prompt.tolist() == _text(tok, '12 + 34 =\n')
  assert sample.completion.tolist() == head + tail
  assert sample.loss_mask.tolist() == [0] * len(head) + [1] * len(tail)
  assert sample.latent_mask.tolist() == [0] + [1] * thoughts + [0] * (1 + len(tail))
  assert coconut.head_tokens('coconut', stage, cfg, tok.vocab) == head  # the forced start of evaluation


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
  """k = epoch // epochs_per_stage up to max_stage + 1 (ProsQA: c=1, 6 stages of 5 epochs, then every step latent
  from epoch 35); the optimizer resets where the stage changes; without a curriculum every epoch is at the final
  stage and nothing resets."""
  cfg = coconut.Curriculum(c_thoughts=1, max_stage=6, epochs_per_stage=5)
  assert [cfg.stage(e) for e in range(0, 45, 5)] == [0, 1, 2, 3, 4, 5, 6, 7, 7]
  assert [cfg.stage(e) for e in (4, 5, 9, 10, 34, 35)] == [0, 1, 1, 2, 6, 7]
  assert [cfg.thoughts(k) for k in (0, 3, 6, 7)] == [0, 3, 6, 6]
  assert cfg.stage_at_step(49, steps_per_epoch=10) == 0 and cfg.stage_at_step(50, steps_per_epoch=10) == 1
  assert cfg.stage_starts(steps_per_epoch=10, total_steps=500) == [50, 100, 150, 200, 250, 300, 350]
  flat = coconut.Curriculum(max_stage=3, curriculum=False)
  assert {flat.stage(e) for e in range(20)} == {4} and flat.stage_starts(10, 200) == []
  gsm8k = coconut.Curriculum(c_thoughts=2, max_stage=3, epochs_per_stage=3)
  assert [gsm8k.stage(e) for e in range(14)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]


def test_bad_values_name_their_key(tok):
  with pytest.raises(ValueError, match='config.coconut.c_thoughts=0 must be >= 1'):
    coconut.Curriculum(c_thoughts=0)
  with pytest.raises(ValueError, match="config.method='latent'"):
    coconut.build_sample(RECORD, 'latent', 0, coconut.Curriculum(), tok)


def test_loss_through_the_engine_equals_coconuts_n_plus_one_passes(tok):
  """The engine's recurrent pass with the gate forced to 1 at <|latent|> gives the same logits as COCONUT's
  reference algorithm: n + 1 full forward passes, each filling the next latent position's input with the previous
  position's last hidden state. The loss covers only the text after the latent span."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dtt_jax.model.dtt import DTTConfig, DTTModel  # pylint: disable=g-import-not-at-top
  from dtt_jax.model.gpt2 import GPT2Config, causal_bias, positions_from_mask  # pylint: disable=g-import-not-at-top
  from dtt_jax.train import coconut as coconut_train  # pylint: disable=g-import-not-at-top

  records = [RECORD, {'question': '5 + 7 =', 'steps': ['5+7=12 write 2 carry 1', 'carry 1 write 1'], 'answer': '12'}]
  vocab = tokens.Vocab.compact([tok.encode_gpt2(t) for r in records
                                for t in (r['question'] + '\n', *[s + '\n' for s in r['steps']], '### ' + r['answer'])])
  compact = tokens.Tokenizer(tok.hf, vocab)
  batch = coconut.build_batch(records, 'coconut', 1, coconut.Curriculum(c_thoughts=2), compact, 12, 24)
  cfg = GPT2Config(vocab_rows=vocab.num_rows, num_tokens=vocab.num_tokens, n_positions=64, n_embd=32, n_layer=2,
                   n_head=4)
  model = DTTModel(DTTConfig(cfg), rngs=nnx.Rngs(0))
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  loss, _ = coconut_train.coconut_loss(model, b)

  # COCONUT's algorithm on prompt + completion (padding masked), one full pass per latent position, then one more.
  tokens_all = jnp.concatenate([b['prompt'], b['completion']], 1)
  mask = jnp.concatenate([b['prompt_mask'], jnp.ones_like(b['completion'])], 1)
  latent = jnp.concatenate([jnp.zeros_like(b['prompt']), b['latent_mask']], 1)
  x = model.gpt2.embed(tokens_all)
  p = b['prompt'].shape[1]
  for j in range(p, tokens_all.shape[1]):
    if bool(jnp.any(latent[:, j])):
      h, _ = model.gpt2(x, positions_from_mask(mask), causal_bias(mask))
      x = x.at[:, j].set(jnp.where(latent[:, j, None] > 0, h[:, j - 1], x[:, j]))
  h, _ = model.gpt2(x, positions_from_mask(mask), causal_bias(mask))
  logits = model.gpt2.logits(h[:, p - 1:-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, b['completion'])
  expected = jnp.sum(nll * b['loss_mask']) / jnp.sum(b['loss_mask'])
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  assert int(b['latent_mask'].sum()) == 4  # 2 records x 1 replaced step x c = 2
  grads = jax.grad(lambda m: coconut_train.coconut_loss(m, b)[0])(model)
  assert float(jnp.abs(grads.gpt2.wte.embedding[...]).max()) > 0


def _curriculum_batches(tok, records, **kw):
  args = dict(method='coconut', cfg=coconut.Curriculum(c_thoughts=1, max_stage=2, epochs_per_stage=1), tokenizer=tok,
              batch_size=2, max_prompt_len=12, max_completion_len=40, steps_per_epoch=3, seed=5)
  args.update(kw)
  return coconut.CurriculumBatches(records, **args)


ADDITION = [{'question': f'{a} + {b} =', 'steps': [f'step {a}', f'step {b}'], 'answer': str(a + b)}
            for a, b in [(12, 34), (5, 7), (40, 2), (9, 9), (13, 8), (21, 21)]]


def test_curriculum_batches_follow_the_schedule_and_resume_exactly(tok):
  """Batch s is laid out at stage s // 3 (1 epoch of 3 steps per stage, then stage 3 = K + 1 for good);
  `stage_changed` is set exactly on the first batch of a stage; state()/restore() continues with identical
  batches."""
  batches = _curriculum_batches(tok, ADDITION)
  seen = [next(batches) for _ in range(12)]
  latents = [int(b['latent_mask'][0].sum()) for b in seen]
  assert latents == [0] * 3 + [1] * 3 + [2] * 3 + [2] * 3  # thoughts(stage): 0, 1, 2, then K c = 2
  changed = []
  fresh = _curriculum_batches(tok, ADDITION)
  for _ in range(12):
    next(fresh)
    changed.append(fresh.stage_changed)
  assert [i for i, c in enumerate(changed) if c] == [3, 6, 9]
  resumed = _curriculum_batches(tok, ADDITION)
  partial = _curriculum_batches(tok, ADDITION)
  for _ in range(7):
    next(partial)
  resumed.restore(partial.state())
  for expected in seen[7:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_records_that_do_not_fit_every_stage_are_dropped_or_named(tok):
  """Stage 0 (all steps as text) is the longest layout here: a completion limit below it drops the record;
  when nothing fits, the error names the shortest lengths needed (`5 + 7 =\n`: 5 tokens; stage 0 of it:
  <|bot|> <|eot|>, 2 x `step n\n` (3 each), `### 12`, eos = 11)."""
  long = {'question': '1 + 1 =', 'steps': ['one plus one is two, ' * 4], 'answer': '2'}
  batches = _curriculum_batches(tok, ADDITION + [long], max_completion_len=20)
  assert len(batches.records) == len(ADDITION)
  with pytest.raises(ValueError, match=r'need data.max_prompt_len >= 5 and data.max_completion_len >= 11 '
                                       r'\(configured 4, 20\)'):
    _curriculum_batches(tok, ADDITION, max_prompt_len=4, max_completion_len=20)


def test_head_length_and_answer_extraction():
  from dtt_jax.train import coconut as coconut_train  # pylint: disable=g-import-not-at-top
  assert coconut_train.head_length(np.array([[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]])) == 3
  assert coconut_train.head_length(np.zeros((2, 5))) == 0
  assert coconut_train.answer_of('<|bot|><|latent|><|eot|>a\n### 1,046<|endoftext|>### 9') == '1046'
  assert coconut_train.answer_of('Tom is a wumpus.\n### Tom is a rempus.') == 'Tom is a rempus.'
