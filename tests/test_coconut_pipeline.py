"""COCONUT in the pipeline: generation with the forced head equals the training pass; a run's budget, optimizer
resets, evaluation at the best checkpoint and start from another run's weights; the configs (tiny study and the
paper's settings)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import coconut as coconut_configs
from dtt_jax import pipeline, tokens
from dtt_jax.checkpoint import Checkpointer
from dtt_jax.methods import base, curriculum, dtt
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2Config
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.train import coconut as coconut_train

EOS, BOT, EOT, LATENT = 0, 1, 2, 3


def test_generation_with_forced_latents_equals_the_training_pass():
  """Greedy generation with <|bot|> <|latent|> x 2 <|eot|> forced and the gate 1 exactly at <|latent|> gives the
  same logits as the training pass (head recurrence + parallel pass) on the generated completion."""
  cfg = GPT2Config(vocab_rows=64, num_tokens=50, n_positions=64, n_embd=32, n_layer=2, n_head=4)
  model = DTTModel(DTTConfig(cfg), rngs=nnx.Rngs(0))
  prompt = jnp.array([[EOS, EOS, 10, 11, 12], [13, 14, 15, 16, 17]], jnp.int32)
  prompt_mask = jnp.array([[0, 0, 1, 1, 1], [1] * 5], jnp.int32)
  head = (BOT, LATENT, LATENT, EOT)
  gen_cfg = engine.GenerateConfig(max_new_tokens=9, eos_id=EOS, bot_id=BOT, eot_id=EOT,
                                  sampling=SamplingConfig(greedy=True), gate_noise=False, early_stop=False,
                                  forced_prefix=head, latent_id=LATENT)
  out = engine.generate(model, prompt, prompt_mask, jax.random.key(0), 1.0, gen_cfg, return_logits=True)
  tokens = np.asarray(out.tokens)
  assert (tokens[:, :4] == head).all()
  assert np.asarray(out.gates).tolist() == [[0.0, 1.0, 1.0] + [0.0] * 6] * 2
  batch = {'prompt': prompt, 'prompt_mask': prompt_mask, 'completion': out.tokens,
           'latent_mask': jnp.asarray(tokens == LATENT, jnp.int32), 'loss_mask': out.mask}
  columns = coconut_train.latent_columns(batch['latent_mask'])
  nll, correct = coconut_train._teacher_forced(model, batch, columns)  # pylint: disable=protected-access
  expected = optax.softmax_cross_entropy_with_integer_labels(out.logits, out.tokens)
  live = np.asarray(out.mask) > 0
  np.testing.assert_allclose(np.asarray(nll)[live], np.asarray(expected)[live], atol=1e-4)
  assert np.asarray(correct)[:, 4:][live[:, 4:]].all()  # greedy after the head


def _tiny_config(**coconut):
  c = coconut_configs.get_config('addition,coconut')
  c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_positions = 1, 32, 2, 80
  c.dataset.train_size, c.dataset.valid_size = 64, 8
  c.bootstrap.batch_size, c.generate.batch_size, c.generate.max_new_tokens = 8, 8, 16
  c.coconut.max_stage, c.coconut.steps_per_epoch, c.coconut.epochs_per_stage = 1, 2, 2
  c.coconut.update(coconut)
  c.coconut.reset_optimizer, c.model.dropout = 'epoch', 0.1  # COCONUT's own (the study turns both off)
  c.bootstrap.eval_every, c.bootstrap.checkpoint_every, c.bootstrap.log_every = 4, 4, 1
  c.stage = 'pipeline'
  return c


def _logged(workdir, key):
  with open(workdir / 'metrics.jsonl') as f:
    return [r[key] for r in map(json.loads, f) if key in r]


def test_run_resets_every_epoch_scores_the_best_checkpoint_and_seeds_a_later_run(tmp_path, monkeypatch,
                                                                                hf_tokenizer):
  """A COCONUT run with the tiny config (COCONUT's optimizer, dropout 0.1, bootstrap.steps = 0): the budget is
  (K + 2) x 2 epochs of 2 steps = 12 steps, stages 0, 1, 2 of 4 steps each; the optimizer restarts every epoch,
  so its step count ends at 2. Validation at steps 4, 8 and 12 with the accuracy forced to 1 at step 8 only: the
  evaluation still scores step 12, the only checkpoint of the final layout (stage 2 = K + 1: `final_accuracy`),
  and a checkpoint asked for (step 8) at its own stage (1), exactly. A second run from epoch 4 (stage 2) with
  `init_from` the first starts from those weights (lr 0: it ends with them)."""
  del hf_tokenizer  # the shared tokenizer must be present
  real = curriculum.make_validate

  def validate_with_best_at_8(exp, graphdef, batches):
    validate = real(exp, graphdef, batches)
    return lambda state, step, tau: {**validate(state, step, tau), 'accuracy': float(step == 8)}

  monkeypatch.setattr(curriculum, 'make_validate', validate_with_best_at_8)
  first = tmp_path / 'first'
  exp = pipeline.setup(_tiny_config(), str(first))
  result = curriculum.run_curriculum(exp)
  assert result.step == 12 and exp.config.bootstrap.steps == 0  # resolved for the run only
  counts = {int(x) for x in jax.tree.leaves(result.state.opt_state) if jnp.issubdtype(x.dtype, jnp.integer)}
  assert counts == {2}
  assert exp.tokenizer.encode('### 46').size == 2  # the compact vocabulary holds COCONUT's layout texts
  assert _logged(first, 'bootstrap/stage') == [0] * 4 + [1] * 4 + [2] * 4
  assert _logged(first, 'bootstrap/epoch') == [e for e in range(6) for _ in range(2)]
  metrics = curriculum.run_eval(exp)
  with open(first / 'eval' / 'valid' / 'bootstrap' / 'metrics.json') as f:
    assert json.load(f) == metrics
  assert (metrics['step'], metrics['curriculum_stage'], metrics['answer_match'], metrics['split']) == (12, 2, 'exact',
                                                                                                       'valid')
  assert metrics['checkpoint'].startswith('best by final_accuracy of steps {12: ')
  exp.config.eval.checkpoint = '8'
  metrics = curriculum.run_eval(exp)
  assert (metrics['step'], metrics['curriculum_stage'], metrics['checkpoint']) == (8, 1, 'asked for')
  with open(first / 'eval' / 'valid@8' / 'bootstrap' / 'completions.jsonl') as f:
    row = json.loads(f.readline())
  assert row['stage'] == 'bootstrap' and row['step'] == 8 and row['generated_tokens'] >= 3
  assert [entry['position'] for entry in row['latent_lens']] == [1]  # c = 1 thought, right after <|bot|>
  assert metrics['num_examples'] == 8 and 0 <= metrics['accuracy'] <= 1
  assert metrics['generated_tokens'] >= 3  # <|bot|>, c = 1 latent, <|eot|> at least

  c = _tiny_config(start_epoch=4, num_epochs=5)  # one epoch at stage 2
  c.init_from, c.bootstrap.lr = str(first), 0.0
  second = tmp_path / 'second'
  later = curriculum.run_curriculum(pipeline.setup(c, str(second)))
  _, best = base.stage_params(exp, 'bootstrap')
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(later.state.params), jax.device_get(best))
  assert later.step == 2 and _logged(second, 'bootstrap/stage') == [2, 2]
  assert Checkpointer(str(second / 'bootstrap' / 'checkpoints'), async_save=False).steps() == [2]

  # DTT's bootstrap from the first run's step 8 (`init_checkpoint`; not its best, a final-stage one), as the study
  # starts it from the end of the CoT run's text stage
  c = _tiny_config()
  c.method, c.bootstrap.steps, c.bootstrap.lr, c.model.dropout = 'dtt', 2, 0.0, 0.0
  c.init_from, c.init_checkpoint = str(first), '8'
  started = dtt.run_bootstrap(pipeline.setup(c, str(tmp_path / 'dtt')))
  _, at_8 = base.stage_params(exp, 'bootstrap', '8')
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(started.state.params), jax.device_get(at_8))
  assert not np.array_equal(jax.device_get(jax.tree.leaves(at_8)[0]), jax.device_get(jax.tree.leaves(best)[0]))


def test_budget_follows_the_schedule_and_a_short_one_is_named():
  """The documented faithful command (real epochs, 5 per stage) trains (K + 2) x 5 = 40 epochs; an explicit
  `bootstrap.steps` that stops before the final stage, or too few `num_epochs`, is a config error naming the key,
  the step where the final stage starts and the fix. Methods without stages take any budget."""
  c = coconut_configs.get_config('prontoqa,coconut')
  c.coconut.steps_per_epoch, c.coconut.epochs_per_stage = 0, 5
  pipeline.check_config(c)  # one pass over the data: its length is known once the data is (run_coconut)
  assert coconut_train.train_steps(c, curriculum.curriculum(c), steps_per_epoch=281) == 40 * 281
  c.bootstrap.steps = 200
  with pytest.raises(ValueError, match=r'config.bootstrap.steps=200 ends before the last stage .* starts at step '
                                       r'9835: set config.bootstrap.steps=0 \(then num_epochs=40: 11240 steps\)'):
    coconut_train.train_steps(c, curriculum.curriculum(c), steps_per_epoch=281)
  c.coconut.steps_per_epoch = 25
  with pytest.raises(ValueError, match=r'config.bootstrap.steps=200 ends .* starts at step 875'):
    pipeline.check_config(c)
  c.bootstrap.steps, c.coconut.num_epochs = 0, 35
  with pytest.raises(ValueError, match=r'config.coconut.num_epochs=35 ends .* set config.coconut.num_epochs above 35'):
    pipeline.check_config(c)
  c.coconut.num_epochs = 36
  pipeline.check_config(c)
  c.method, c.bootstrap.steps = 'cot', 200
  pipeline.check_config(c)


def test_paper_settings():
  """`configs/coconut.py:<dataset>,<method>,paper` is the official recipe: GSM8K with c = 2, K = 3, 3 epochs per
  stage, 25 epochs, COCONUT from epoch 3 (stage 1, official `resume: 3`) on a CoT run's weights (an error names
  `init_from` until one is given); ProntoQA / ProsQA with c = 1, K = 6, 5 epochs per stage, 50 epochs. AdamW lr
  1e-4, decay 0.01, reset every epoch, dropout 0.1, global batch 128; at most 64 (GSM8K) / 128 new tokens after
  the forced head; validation every epoch and the test split scored exactly."""
  c = coconut_configs.get_config('gsm8k,coconut,paper')
  with pytest.raises(ValueError, match='config.coconut.start_epoch=3 skips the first stages .* set config.init_from'):
    pipeline.check_config(c)
  c.init_from = 'runs/gsm8k_cot'
  pipeline.check_config(c)
  schedule = curriculum.curriculum(c)
  assert (schedule.c_thoughts, schedule.max_stage, schedule.epochs_per_stage, schedule.start_epoch) == (2, 3, 3, 3)
  assert [schedule.stage_at_step(s, 100) for s in (0, 299, 300, 900, 2199)] == [1, 1, 2, 4, 4]
  assert coconut_train.train_steps(c, schedule, 100) == 2200  # epochs 3..24
  assert (c.model.init, c.model.vocab, c.model.dropout, c.coconut.steps_per_epoch) == ('gpt2', 'full', 0.1, 0)
  assert (c.bootstrap.schedule, c.bootstrap.decay, c.bootstrap.grad_clip, c.coconut.reset_optimizer, c.bootstrap.lr,
          c.bootstrap.weight_decay) == ('constant', 'all', 0.0, 'epoch', 1e-4, 0.01)
  assert (c.bootstrap.batch_size, c.bootstrap.steps, c.bootstrap.best_metric) == (128, 0, 'accuracy')
  assert (c.eval.answer_match, c.eval.split, c.coconut.eval_every_epochs) == ('exact', 'test', 1)
  gen = coconut_train.generate_config('coconut', 4, schedule, tokens.Vocab.full(), c.generate.max_new_tokens)
  assert len(gen.forced_prefix) == 8 and gen.max_new_tokens == 8 + 64  # <|bot|>, 3 x 2 latents, <|eot|>
  assert coconut_configs.get_config('gsm8k,cot,paper').coconut.start_epoch == 0
  for dataset in ('prontoqa', 'prosqa'):
    c = coconut_configs.get_config(f'{dataset},coconut,paper')
    pipeline.check_config(c)
    k = c.coconut
    assert (k.c_thoughts, k.max_stage, k.epochs_per_stage, k.num_epochs, k.start_epoch) == (1, 6, 5, 50, 0)
    assert c.generate.max_new_tokens == 128


@pytest.mark.parametrize('dataset,scale', [(d, '') for d in coconut_configs.DATASETS] +
                         [(d, 'long') for d in coconut_configs.SUITE])
@pytest.mark.parametrize('method', coconut_configs.METHODS)
def test_study_configs_are_valid(dataset, scale, method):
  """Every method of a tiny-scale task gets the same budget (DTT: as bootstrap.steps): docs/study.md's tasks one
  epoch per stage, the final one included; the suite of docs/study.md its text stage, one 50-step epoch per
  latent stage (',long': 20) and 3 stages' epochs of the final stage (addition at 2 digits: 800 + 3 x 50 + 150;
  long: 800 + 3 x 1000 + 3000)."""
  c = coconut_configs.get_config(f'{dataset},{method}' + (f',{scale}' if scale else ''))
  pipeline.check_config(c)
  assert c.method == {'coconut_no_curriculum': 'coconut', 'dtt_compress': 'dtt'}.get(method, method)
  assert c.coconut.curriculum == (method != 'coconut_no_curriculum')
  k = c.coconut
  if dataset in coconut_configs.SUITE:
    budget = coconut_configs.TEXT_STEPS[dataset] + 50 * (k.max_stage + 3) * (20 if scale else 1)
  else:
    budget = k.steps_per_epoch * (k.max_stage + 2)
  if method in coconut_configs.DTT_METHODS:
    assert c.bootstrap.steps == budget
    assert c.data.span == ('curriculum' if method == 'dtt_compress' else 'cot')
  else:
    assert c.bootstrap.steps == 0
    assert coconut_train.train_steps(c, curriculum.curriculum(c), k.steps_per_epoch) == budget
  if method == 'icot':  # every CoT token is gone when the final stage starts, none before the text stage ends
    schedule = curriculum.curriculum(c)
    end = schedule.removal_end(coconut_configs.ICOT_LONGEST[dataset], k.steps_per_epoch)
    assert k.icot_pretrain_epochs * k.steps_per_epoch < end <= schedule.last_stage_start(k.steps_per_epoch) or (
        k.icot_pretrain_epochs == 0)


# The fields that make one recipe: the optimizer, its schedule and resets, dropout, the checkpoint scored, the
# answer rule (issue #29: a study table's methods differ in their layout and loss only).
RECIPE = ('bootstrap.lr', 'bootstrap.schedule', 'bootstrap.warmup_steps', 'bootstrap.weight_decay', 'bootstrap.decay',
          'bootstrap.grad_clip', 'bootstrap.batch_size', 'coconut.reset_optimizer', 'model.dropout',
          'bootstrap.best_checkpoint', 'eval.answer_match', 'eval.split', 'model.n_layer', 'model.n_embd')


@pytest.mark.parametrize('dataset,scale', [(d, '') for d in coconut_configs.DATASETS] +
                         [(d, 'long') for d in coconut_configs.SUITE] +
                         [(d, 'paper') for d in coconut_configs.PAPER_DATASETS])
def test_every_method_of_a_study_shares_one_recipe(dataset, scale):
  """Every method of one study (a task at one scale) trains with the same optimizer, schedule, clipping, weight
  decay, dropout and batch, scores the final layout's best checkpoint and matches answers by one rule: COCONUT's
  optimizer (constant lr, decay on all parameters) and exact match; at paper scale COCONUT's dropout 0.1 and no
  clipping, where DTT is compared too no dropout and clipping at norm 1."""
  methods = coconut_configs.METHODS[:-len(coconut_configs.DTT_METHODS)] if scale == 'paper' else coconut_configs.METHODS
  values = {}
  for method in methods:
    c = coconut_configs.get_config(f'{dataset},{method}' + (f',{scale}' if scale else ''))
    values[method] = tuple(c[section][name] for section, name in (key.split('.') for key in RECIPE))
  assert len(set(values.values())) == 1, values
  recipe = dict(zip(RECIPE, values['coconut']))
  assert (recipe['bootstrap.schedule'], recipe['bootstrap.decay'], recipe['bootstrap.grad_clip'],
          recipe['model.dropout'], recipe['bootstrap.best_checkpoint'], recipe['eval.answer_match']) == (
              'constant', 'all', 0.0 if scale == 'paper' else 1.0, 0.1 if scale == 'paper' else 0.0,
              'final_accuracy', 'exact')


def test_bad_method_and_stage_are_named():
  with pytest.raises(ValueError, match='configs/coconut.py:\'prontoqa,latent\': expected "<dataset>,<method>'):
    coconut_configs.get_config('prontoqa,latent')
  with pytest.raises(ValueError, match='dtt, dtt_compress not with "paper"'):
    coconut_configs.get_config('gsm8k,dtt,paper')
  with pytest.raises(ValueError, match='addition4, prosqa_mini with "long"'):
    coconut_configs.get_config('prontoqa,coconut,long')
  c = coconut_configs.get_config('prontoqa,cot')
  c.stage = 'grpo'
  with pytest.raises(ValueError, match='config.stage="grpo" does not apply to config.method=\'cot\''):
    pipeline.check_config(c)
  c.method = 'latent'
  with pytest.raises(ValueError, match="config.method='latent': expected one of 'dtt', 'think_tokens', 'coconut'"):
    pipeline.check_config(c)

