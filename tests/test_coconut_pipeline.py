"""COCONUT in the pipeline: generation with the forced head equals the training pass, the optimizer resets at
stage changes, the configs of the study, and the study table."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import coconut as coconut_configs
from dtt_jax import pipeline
from dtt_jax.eval import study
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
  nll, correct = coconut_train._teacher_forced(model, batch, coconut_train.head_length(batch['latent_mask']))  # pylint: disable=protected-access
  expected = optax.softmax_cross_entropy_with_integer_labels(out.logits, out.tokens)
  live = np.asarray(out.mask) > 0
  np.testing.assert_allclose(np.asarray(nll)[live], np.asarray(expected)[live], atol=1e-4)
  assert np.asarray(correct)[:, 4:][live[:, 4:]].all()  # greedy after the head


def _tiny_config(tmp_path, **coconut):
  c = coconut_configs.get_config('addition,coconut')
  c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_positions = 1, 32, 2, 64
  c.dataset.train_size, c.dataset.valid_size = 64, 8
  c.bootstrap.batch_size, c.generate.batch_size = 8, 8
  c.coconut.max_stage, c.coconut.steps_per_epoch = 2, 2
  c.coconut.update(coconut)
  c.bootstrap.steps, c.bootstrap.eval_every, c.bootstrap.checkpoint_every, c.bootstrap.warmup_steps = 8, 4, 4, 1
  c.bootstrap.log_every = 1
  c.stage = 'pipeline'
  return c


@pytest.mark.parametrize('reset', [True, False])
def test_optimizer_state_resets_at_stage_changes(tmp_path, reset, hf_tokenizer):
  """Stages of 2 steps (0, 1, 2, then the final 3 from step 6): with reset_optimizer the optimizer step count
  restarts there, so after 8 steps it is 2; without, 8."""
  del hf_tokenizer  # the shared tokenizer must be present
  c = _tiny_config(tmp_path, reset_optimizer=reset)
  exp = pipeline.setup(c, str(tmp_path))
  result = pipeline.run_coconut(exp)
  counts = {int(x) for x in jax.tree.leaves(result.state.opt_state) if jnp.issubdtype(x.dtype, jnp.integer)}
  assert counts == ({2} if reset else {8})
  assert exp.tokenizer.encode('### 46').size == 2  # the compact vocabulary holds COCONUT's layout texts
  stages = [json.loads(line).get('bootstrap/stage') for line in open(tmp_path / 'metrics.jsonl')]
  assert [s for s in stages if s is not None] == [0, 0, 1, 1, 2, 2, 3, 3]
  metrics = pipeline.run_eval(exp)
  with open(tmp_path / 'eval' / 'metrics.json') as f:
    assert json.load(f) == metrics
  assert metrics['stage'] == 3 and metrics['num_examples'] == 8 and 0 <= metrics['accuracy'] <= 1
  assert metrics['generated_tokens'] >= 4  # <|bot|>, K c = 2 latents, <|eot|> at least


@pytest.mark.parametrize('dataset', coconut_configs.DATASETS)
@pytest.mark.parametrize('method', coconut_configs.METHODS)
def test_study_configs_are_valid(dataset, method):
  c = coconut_configs.get_config(f'{dataset},{method}')
  pipeline.check_config(c)
  assert c.method == ('coconut' if method == 'coconut_no_curriculum' else method)
  assert c.coconut.curriculum == (method != 'coconut_no_curriculum')
  assert c.bootstrap.steps == c.coconut.steps_per_epoch * (c.coconut.max_stage + 2)  # same budget for all


def test_bad_method_and_stage_are_named():
  with pytest.raises(ValueError, match='configs/coconut.py:\'prontoqa,latent\': expected "<dataset>,<method>"'):
    coconut_configs.get_config('prontoqa,latent')
  c = coconut_configs.get_config('prontoqa,cot')
  c.stage = 'grpo'
  with pytest.raises(ValueError, match='config.stage="grpo" does not apply to config.method=\'cot\''):
    pipeline.check_config(c)
  c.method = 'latent'
  with pytest.raises(ValueError, match="config.method='latent': expected one of 'dtt', 'think_tokens', 'coconut'"):
    pipeline.check_config(c)


def test_study_table_reads_the_runs(tmp_path):
  for name, metrics in (('prontoqa_coconut', {'accuracy': 0.5, 'generated_tokens': 9.25, 'num_examples': 200}),
                        ('prosqa_dtt', {'accuracy': 0.125, 'completion_tokens': 30.0, 'num_examples': 300})):
    os.makedirs(tmp_path / name / 'eval')
    with open(tmp_path / name / 'eval' / 'metrics.json', 'w') as f:
      json.dump(metrics, f)
  text = study.render(str(tmp_path), 'launch/reproduce.sh x')
  assert '| COCONUT | 50.0 | 9.2 | 99.8 / 9.0 | not run |  | 97.0 / 14.2 |' in text
  assert '| DTT (bootstrap + GRPO) | not run |  | — | 12.5 | 30.0 | — |' in text
  assert text.startswith('Command: `launch/reproduce.sh x`')
