"""COCONUT: the latent replacement per curriculum stage (exact ids), the baselines, the schedule, and the loss
through the engine against COCONUT's n + 1 passes."""

import numpy as np
import pytest

from configs import base as base_config
from dtt_jax import tokens
from dtt_jax.data import coconut
from dtt_jax.methods import curriculum

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


def test_a_longer_text_stage_shifts_the_later_stages():
  """`first_stage_epochs` F: stage 0 for F epochs, then one stage per `epochs_per_stage` (the study's schedule:
  addition at 2 digits, F = 8, K = 3); the budget is F + (K + 1) epochs; a run started at epoch F (from the CoT
  run's checkpoint there) has the same stages at the same epochs; without a curriculum nothing changes."""
  from dtt_jax.train import coconut as coconut_train  # pylint: disable=g-import-not-at-top
  cfg = coconut.Curriculum(max_stage=3, epochs_per_stage=1, first_stage_epochs=8)
  assert [cfg.stage(e) for e in range(13)] == [0] * 8 + [1, 2, 3, 4, 4]
  assert cfg.text_epochs == 8 and cfg.schedule_epochs == 12 and cfg.last_stage_start(100) == 1100
  resumed = coconut.Curriculum(max_stage=3, epochs_per_stage=1, first_stage_epochs=8, start_epoch=8)
  assert [resumed.stage_at_step(s, 100) for s in (0, 99, 100, 299, 300, 399)] == [1, 1, 2, 3, 4, 4]
  assert resumed.last_stage_start(100) == 300 and resumed.reset_steps(100, 400, 1) == [100, 200, 300]
  assert coconut.Curriculum(max_stage=3, epochs_per_stage=2, first_stage_epochs=5).stage(9) == 3  # 5 + 2 + 2
  assert {coconut.Curriculum(max_stage=3, first_stage_epochs=8, curriculum=False).stage(e) for e in range(9)} == {4}
  c = base_config.get_config()
  c.coconut.max_stage, c.coconut.epochs_per_stage, c.coconut.first_stage_epochs = 3, 1, 8
  assert coconut_train.num_epochs(c) == 12
  c.coconut.reset_optimizer = 'stage'
  with pytest.raises(ValueError, match='config.coconut.first_stage_epochs=8 with reset_optimizer="stage"'):
    coconut_train.check_config(c, coconut.Curriculum.from_config(c.coconut))


def test_optimizer_resets_follow_the_schedule_the_same_for_every_method():
  """Every method of one comparison (the baselines and COCONUT w/o curriculum included, whose data never changes)
  restarts its optimizer at the same steps: every epoch (COCONUT's run.py) or every stage of the schedule
  (`coconut.reset_optimizer`), the compressing DTT too; `start_epoch` (GSM8K: 3) shifts the epochs, so a run
  resumed into the schedule keeps its blocks."""
  from configs import coconut as coconut_configs  # pylint: disable=g-import-not-at-top
  from dtt_jax.train import coconut as coconut_train  # pylint: disable=g-import-not-at-top

  expected = {'epoch': list(range(10, 160, 10)), 'stage': list(range(20, 160, 20))}
  for every, resets in expected.items():
    for method in set(coconut_configs.METHODS) - {'dtt'}:
      c = coconut_configs.get_config(f'prontoqa,{method}')
      c.coconut.reset_optimizer, c.coconut.epochs_per_stage = every, 2
      c.bootstrap.steps = 0  # the compressing DTT's budget follows the schedule too
      schedule = curriculum.curriculum(c)
      steps = coconut_train.train_steps(c, schedule, steps_per_epoch=10)  # (6 + 2) stages x 2 epochs x 10 steps
      assert steps == 160
      assert schedule.reset_steps(10, steps, coconut_train.reset_every_epochs(c)) == resets, (every, method)
      c.coconut.reset_optimizer = 'never'
      assert schedule.reset_steps(10, steps, coconut_train.reset_every_epochs(c)) == []
  gsm8k = coconut.Curriculum(c_thoughts=2, max_stage=3, epochs_per_stage=3, start_epoch=3)
  assert [gsm8k.stage_at_step(s, 10) for s in (0, 29, 30, 89, 90, 219)] == [1, 1, 2, 3, 4, 4]
  assert gsm8k.reset_steps(10, 220, every_epochs=3) == list(range(30, 220, 30))  # epochs 6, 9, ..., 24
  assert gsm8k.reset_steps(10, 45, every_epochs=1) == [10, 20, 30, 40] and gsm8k.last_stage_start(10) == 90


def test_coconut_optimizer_is_torch_adamw_at_a_constant_rate():
  """The paper configs' optimizer is the official one, `torch.optim.AdamW(model.parameters(), lr,
  weight_decay)` recreated every epoch: constant lr from the first step, decoupled weight decay on every parameter
  (vectors too), no gradient clipping. Checked against torch's update written in NumPy over 3 steps with gradients
  far above any clipping norm."""
  from configs import coconut as coconut_configs  # pylint: disable=g-import-not-at-top
  from dtt_jax.train import coconut as coconut_train  # pylint: disable=g-import-not-at-top

  c = coconut_configs.get_config('prontoqa,coconut,paper')
  assert (c.bootstrap.schedule, c.bootstrap.decay, c.bootstrap.grad_clip, c.coconut.reset_optimizer,
          c.model.dropout) == ('constant', 'all', 0.0, 'epoch', 0.1)
  lr, wd = c.bootstrap.lr, c.bootstrap.weight_decay
  tx = coconut_train.make_optimizer(c, steps_per_epoch=10, total_steps=80)
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(3, 4)).astype(np.float32), 'bias': rng.normal(size=(4,)).astype(np.float32)}
  state, got = tx.init(params), dict(params)
  want = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in want.items()}
  v2 = {k: np.zeros_like(v) for k, v in want.items()}
  for t in range(1, 4):
    grads = {k: (100 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
    updates, state = tx.update(grads, state, got)
    got = {k: np.asarray(got[k] + updates[k]) for k in got}
    for k in want:  # torch.optim.AdamW: decay, then the Adam step (betas 0.9, 0.999, eps 1e-8)
      want[k] = want[k] * (1 - lr * wd)
      m[k] = 0.9 * m[k] + 0.1 * grads[k]
      v2[k] = 0.999 * v2[k] + 0.001 * grads[k].astype(np.float64) ** 2
      want[k] -= lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v2[k] / (1 - 0.999 ** t)) + 1e-8)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_bad_values_name_their_key(tok):
  with pytest.raises(ValueError, match='config.coconut.c_thoughts=0 must be >= 1'):
    coconut.Curriculum(c_thoughts=0)
  with pytest.raises(ValueError, match="config.method='latent'"):
    coconut.build_sample(RECORD, 'latent', 0, coconut.Curriculum(), tok)


def test_loss_and_gradients_equal_coconuts_n_plus_one_full_passes(tok):
  """The training pass (one GPT-2 pass per piece between latent columns, over the KV cache of the pieces before)
  gives the loss AND the gradient of every parameter of COCONUT's reference algorithm: n + 1 full forward passes,
  each filling the next latent column's input with the previous column's last hidden state. Both run GPT-2's
  training-mode dropout (rate 0.1) from one key and draw the same masks, since a mask depends on the sequence
  column, not on the pass; another key gives another loss. The loss covers only the text after the latent span."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dtt_jax.model.dtt import DTTConfig, DTTModel  # pylint: disable=g-import-not-at-top
  from dtt_jax.model.gpt2 import (Dropout, GPT2Config, causal_bias,  # pylint: disable=g-import-not-at-top
                                  positions_from_mask)
  from dtt_jax.train import coconut as coconut_train  # pylint: disable=g-import-not-at-top

  records = [RECORD, {'question': '5 + 7 =', 'steps': ['5+7=12 write 2 carry 1', 'carry 1 write 1'], 'answer': '12'}]
  vocab = tokens.Vocab.compact([tok.encode_gpt2(t) for r in records
                                for t in (r['question'] + '\n', *[s + '\n' for s in r['steps']], '### ' + r['answer'])])
  compact = tokens.Tokenizer(tok.hf, vocab)
  batch = coconut.build_batch(records, 'coconut', 1, coconut.Curriculum(c_thoughts=2), compact, 12, 24)
  cfg = GPT2Config(vocab_rows=vocab.num_rows, num_tokens=vocab.num_tokens, n_positions=64, n_embd=16, n_layer=1,
                   n_head=2)
  graphdef, params = nnx.split(DTTModel(DTTConfig(cfg), rngs=nnx.Rngs(0)))
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  latent = np.concatenate([np.zeros_like(batch['prompt']), batch['latent_mask']], 1)  # [B,S] on the host
  rate = 0.1

  def loss(params, key):
    return coconut_train.coconut_loss(nnx.merge(graphdef, params), b, key, dropout=rate)[0]

  def reference(params, key):  # COCONUT's algorithm on prompt + completion (padding masked)
    model = nnx.merge(graphdef, params)
    tokens_all = jnp.concatenate([b['prompt'], b['completion']], 1)
    mask = jnp.concatenate([b['prompt_mask'], jnp.ones_like(b['completion'])], 1)
    drop = Dropout(key, rate, tokens_all.shape[1])
    x = model.gpt2.embed(tokens_all)
    p = b['prompt'].shape[1]
    for j in range(p, tokens_all.shape[1]):
      if latent[:, j].any():
        h, _ = model.gpt2(x, positions_from_mask(mask), causal_bias(mask), dropout=drop)
        x = x.at[:, j].set(jnp.where(latent[:, j, None] > 0, h[:, j - 1], x[:, j]))
    h, _ = model.gpt2(x, positions_from_mask(mask), causal_bias(mask), dropout=drop)
    nll = optax.softmax_cross_entropy_with_integer_labels(model.gpt2.logits(h[:, p - 1:-1]), b['completion'])
    return jnp.sum(nll * b['loss_mask']) / jnp.sum(b['loss_mask'])

  key = jax.random.key(3)
  train_fn = jax.jit(jax.value_and_grad(loss))
  (got, got_grads), (want, want_grads) = train_fn(params, key), jax.jit(jax.value_and_grad(reference))(params, key)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert int(latent.sum()) == 4  # 2 records x 1 replaced step x c = 2
  assert float(jnp.abs(got_grads['gpt2']['wte']['embedding']).max()) > 0
  assert abs(float(got) - float(train_fn(params, jax.random.key(4))[0])) > 1e-4  # the masks are drawn and applied


def test_dropout_is_gpt2s_training_mode_and_zero_rate_changes_nothing():
  """Dropout zeroes about `rate` of the activations and scales the rest by 1 / (1 - rate) (as torch); a column's
  mask is the same whatever piece of the sequence it is computed in; rate 0 returns its input (the parity tests
  cover the model without dropout)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dtt_jax.model.gpt2 import Dropout  # pylint: disable=g-import-not-at-top

  drop = Dropout(jax.random.key(0), 0.1, 16)
  out = np.asarray(drop.hidden(jnp.ones((8, 64, 32)), 0, jnp.arange(64)))
  np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.9], rtol=1e-6)
  assert abs((out == 0).mean() - 0.1) < 0.01
  np.testing.assert_array_equal(np.asarray(drop.hidden(jnp.ones((8, 10, 32)), 0, jnp.arange(5, 15))), out[:, 5:15])
  probs = np.asarray(drop.probs(jnp.ones((2, 3, 16, 16)), 1, jnp.arange(16)))  # [B,H,T,Tk]
  np.testing.assert_array_equal(np.asarray(drop.probs(jnp.ones((2, 3, 4, 9)), 1, jnp.arange(5, 9))),
                                probs[:, :, 5:9, :9])  # 4 queries over a 9-key cache: the same masks
  x = jnp.ones((2, 3, 4))
  assert Dropout(jax.random.key(1), 0.0, 3).hidden(x, 0, jnp.arange(3)) is x


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
  assert coconut_train.latent_columns(np.array([[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]])) == (1, 2)
  assert coconut_train.head_length(np.zeros((2, 5))) == 0 and coconut_train.latent_columns(np.zeros((2, 5))) == ()
  assert coconut_train.answer_of('<|bot|><|latent|><|eot|>a\n### 1,046<|endoftext|>### 9') == '1046'
  assert coconut_train.answer_of('Tom is a wumpus.\n### Tom is a rempus.') == 'Tom is a rempus.'


def test_scoring_is_exact_by_default_and_lenient_on_request():
  """COCONUT mode scores like the official evaluation: the text after the last `#` must equal the answer (commas
  removed), so `True, because ...` and `72.00001` are wrong; the lenient per-dataset rules accept both."""
  from configs import coconut as coconut_configs  # pylint: disable=g-import-not-at-top
  from dtt_jax.train import coconut as coconut_train  # pylint: disable=g-import-not-at-top
  assert coconut_configs.get_config('prontoqa,coconut').eval.answer_match == 'exact'
  head = '<|bot|><|latent|><|latent|><|eot|>'
  assert coconut_train.score('prontoqa', head + '### True, because<|endoftext|>', 'True') == ('True because', False)
  assert coconut_train.score('prontoqa', head + '### True, because<|endoftext|>', 'True', 'lenient')[1]
  assert coconut_train.score('prontoqa', head + '### True<|endoftext|>', 'True') == ('True', True)
  assert not coconut_train.score('gsm8k', '<<6*12=72>>\n### 72.00001<|endoftext|>', '72')[1]
  assert coconut_train.score('gsm8k', '<<6*12=72>>\n### 72.00001<|endoftext|>', '72', 'lenient')[1]
  assert coconut_train.score('gsm8k', '### 1,234<|endoftext|>', '1,234') == ('1234', True)
