"""Dynamic Thinking Tokens (the paper's method): Stage 1, the supervised bootstrap (`train/bootstrap.py`), then
Stage 2, GRPO (`rl/grpo.py`, rollouts by `rl/rollout.py`); greedy latent decoding with the engine at evaluation,
scored by `eval.answer_match` on the text after `<|eot|>` (`reward/reward.py`, `eval/evaluate.py`).

Data: Stage 1 builds `<|bot|> span <|eot|> answer` sequences. The seed's recipe (`data.span` 'none' or 'cot',
`data.stage1_iterator`): a filler or the CoT span, one position per token. The compressing recipe
(`data.span='curriculum'`, `data/coconut.py`'s 'dtt' layout): the CoT span under `config.coconut`'s stage schedule,
stage k replacing the first k steps by ceil(m / r) `<|latent|>` positions each (r = `coconut.tokens_per_latent`),
whose targets are `<|latent|>` and whose gate the hinge pushes towards 1; the optimizer resets as the COCONUT
methods' (`coconut.reset_optimizer`). Stage 2 draws prompts (`data.prompt_iterator`) whose completions the policy
samples.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtt_jax import data as data_lib
from dtt_jax import parallel, reward
from dtt_jax import workdir as workdir_lib
from dtt_jax.data import coconut as coconut_data
from dtt_jax.data.answers import extract_answer
from dtt_jax.eval import evaluate as eval_lib
from dtt_jax.eval import heldout, report
from dtt_jax.methods import base
from dtt_jax.metrics import MetricWriter
from dtt_jax.model import lora
from dtt_jax.rl import grpo, rollout
from dtt_jax.train import bootstrap, grads, loop, state as state_lib
from dtt_jax.train import coconut as coconut_train

log = logging.getLogger(__name__)


class DTT(base.Method):
  stages = ('bootstrap', 'grpo')

  def check_config(self, c) -> None:
    if c.bootstrap.steps <= 0:
      raise ValueError(f'config.bootstrap.steps={c.bootstrap.steps} must be positive.')
    grpo.check_config(c.grpo)  # raises on bad GRPO values (loss_agg, gate_as_action without gate_noise, ...)
    if c.grpo.length_reward not in reward.LENGTH_REWARDS:
      raise ValueError(f'config.grpo.length_reward={c.grpo.length_reward!r}: expected one of '
                       f'{", ".join(map(repr, reward.LENGTH_REWARDS))}.')
    if not 0 <= c.grpo.min_think <= c.grpo.max_think:
      raise ValueError(f'config.grpo.min_think={c.grpo.min_think}: expected 0 (no drawn budgets) up to '
                       f'config.grpo.max_think={c.grpo.max_think}.')
    if compressing(c):
      coconut_data.Curriculum.from_config(c.coconut)  # raises naming a bad config.coconut value
      if not c.coconut.latent_targets and c.coconut.tokens_per_latent:
        raise ValueError(f'config.coconut.tokens_per_latent={c.coconut.tokens_per_latent} gives each record its own '
                         'latent count, which a forced head cannot: set it to 0 (COCONUT\'s k * c_thoughts) or '
                         'config.coconut.latent_targets=True (the model emits its latents).')
    if c.model.pin_text and not c.model.pin_latent:
      raise ValueError('config.model.pin_text=True pins every gate but the latents\' to 0: it needs '
                       'config.model.pin_latent=True (the latents\' gate pinned to 1).')
    if c.model.pin_latent and (c.model.gate != 'dtt' or c.grpo.gate_as_action):
      raise ValueError('config.model.pin_latent=True pins the Gumbel-sigmoid gate through its noise: it needs '
                       'config.model.gate="dtt" and config.grpo.gate_as_action=False.')

  uses_dropout = True  # in the bootstrap (GRPO, validation and evaluation run without)

  def vocab_texts(self, c, records):
    return coconut_data.all_layout_texts(records) if compressing(c) else ()

  def train(self, exp: base.Experiment, stage: str) -> loop.LoopResult:
    return run_bootstrap(exp) if stage == 'bootstrap' else run_grpo(exp)

  def evaluate(self, exp: base.Experiment) -> dict[str, float]:
    return run_eval(exp)

  def decode(self, exp, prompts, stage, checkpoint='best', budget=None, sampling=None, seed=0,
             max_new_tokens=0) -> base.Decoded:
    return decode_prompts(exp, prompts, stage, checkpoint, budget, sampling, seed, max_new_tokens)


# -------------------------------------------------------------------------------------------------- Stage 1


def bootstrap_optimizer(c, schedule_steps: int = 0):
  """The supervised optimizer of `config.bootstrap` (`state.supervised_optimizer`), its schedule over
  `schedule_steps` (default: the stage's steps)."""
  return state_lib.supervised_optimizer(c.bootstrap, schedule_steps or c.bootstrap.steps,
                                        lora.configured_train_modules(c.get('lora')))


def pinned_id(c, vocab) -> int:
  """The token whose gate is pinned to 1 (`config.model.pin_latent`: `<|latent|>`), else -1."""
  return vocab.latent if c.model.pin_latent else -1


def compressing(c) -> bool:
  """Whether the bootstrap follows the compressing curriculum (`data.span='curriculum'`)."""
  return c.data.span == 'curriculum'


def forced_head(c, vocab, stage: str, step: int, budget: int | None = None) -> tuple[int, ...]:
  """The tokens decoding forces first: with the compressing recipe's forced latents (`coconut.latent_targets`
  False), `<|bot|>` and the latents of the stage checkpoint `step` was trained at (GRPO: the final stage's), or
  `budget` of them (COCONUT's head without its `<|eot|>`: the model closes the span itself); () otherwise."""
  if not compressing(c) or c.coconut.latent_targets:
    return ()
  schedule = coconut_data.Curriculum.from_config(c.coconut)
  layout = schedule.max_stage + 1 if stage == 'grpo' else schedule.stage_at_step(max(step - 1, 0),
                                                                                   c.coconut.steps_per_epoch)
  return (vocab.bot,) + (vocab.latent,) * (schedule.thoughts(layout) if budget is None else budget)


def decode_config(exp: base.Experiment, stage: str, step: int, budget: int | None = None, max_new_tokens: int = 0,
                  return_hidden: bool = False):
  """(engine.GenerateConfig, think_budget) of DTT's greedy decoding at the checkpoint `step` of `stage`: the gate
  pinned at `<|latent|>` with `model.pin_latent`; a reasoning `budget` is the forced head's latents
  (`forced_head`), else `<|eot|>` forced after that many span positions (`think_budget`)."""
  c = exp.config
  new_tokens = max_new_tokens or c.generate.max_new_tokens
  head = forced_head(c, exp.vocab, stage, step, budget)
  gen_cfg = eval_lib.greedy_config(exp.vocab, len(head) + new_tokens, c.generate.max_think, return_hidden,
                                   pinned_id(c, exp.vocab), c.model.pin_text)
  if head:
    return dataclasses.replace(gen_cfg, forced_prefix=head), None
  return gen_cfg, budget


def curriculum_batches(exp: base.Experiment) -> coconut_data.CurriculumBatches:
  """The compressing recipe's Stage-1 batches: the 'dtt' layout at the schedule's stage of each step."""
  c = exp.config
  return coconut_data.CurriculumBatches(exp.train, 'dtt', coconut_data.Curriculum.from_config(c.coconut),
                                        exp.tokenizer, c.bootstrap.batch_size, c.data.max_prompt_len,
                                        c.data.max_completion_len, c.coconut.steps_per_epoch, seed=c.seed,
                                        process_index=jax.process_index(), process_count=jax.process_count())


def run_bootstrap(exp: base.Experiment) -> loop.LoopResult:
  c, b = exp.config, exp.config.bootstrap
  parallel.check_divisible(b.batch_size, exp.mesh, 'bootstrap.batch_size')
  if compressing(c):
    batches = curriculum_batches(exp)
    resets = set(batches.reset_steps(b.steps, coconut_train.reset_every_epochs(c)))
    is_final = batches.is_final
    tx = coconut_train.make_optimizer(c, batches.steps_per_epoch, b.steps,
                                      lora.configured_train_modules(c.get('lora')))
    log.info('dtt (compressing curriculum): stages start at steps %s; optimizer resets at %d steps.',
             batches.stage_starts(b.steps), len(resets))
  else:
    batches = data_lib.stage1_iterator(exp.train, exp.tokenizer, c.data, b.batch_size, seed=c.seed,
                                       process_index=jax.process_index(), process_count=jax.process_count())
    resets, is_final = set(), lambda step: True
    tx = bootstrap_optimizer(c)
  graphdef, state = base.initial_state(exp, tx)  # with config.init_from: e.g. a CoT run's weights
  loss_cfg = bootstrap.LossConfig.from_config(b, dropout=c.model.dropout, pinned_id=pinned_id(c, exp.vocab),
                                              pin_others=c.model.pin_text)
  train_step = bootstrap.make_train_step(graphdef, tx, loss_cfg, exp.mesh, b.microbatches,
                                         grads.trained_filter(lora.configured_train_modules(c.get('lora'))))

  def step_fn(state, batch, tau):
    if int(state.step) in resets:
      state = state.replace(opt_state=parallel.shard_state(tx.init(state.params), exp.mesh))
    return train_step(state, parallel.shard_batch(batch, exp.mesh), tau)

  return base.run_stage(exp, 'bootstrap', state, step_fn, batches, make_validate(exp, graphdef, 'bootstrap',
                                                                                is_final))


def make_validate(exp: base.Experiment, graphdef, stage: str, is_final=lambda step: True):
  """validate(state, step, tau) -> greedy-generation metrics on the held-out prompts (`final_accuracy` too where
  `is_final(last trained step)`, `base.FINAL_METRIC`), plus teacher-forced gate means on the same examples with a
  filler span in every one (`tf_gate_inner`, `tf_gate_outer`)."""
  c = exp.config
  prompts = base.validation_prompts(exp)
  records = exp.valid[:c.dataset.valid_size]
  span_cfg = dataclasses.replace(data_lib.SampleConfig.from_config({**c.data, 'span': 'cot'} if compressing(c)
                                                                    else c.data), filler_prob=1.0)
  span_batch = data_lib.stage1_batch(records, exp.tokenizer, span_cfg, seed=c.seed)

  def validate(state, step, tau):
    gen_cfg, _ = decode_config(exp, stage, step)
    result = eval_lib.evaluate(nnx.merge(graphdef, state.params), prompts.prompt, prompts.prompt_mask,
                               prompts.questions, prompts.answers, exp.tokenizer, c.dataset.name, gen_cfg, tau,
                               c.generate.batch_size, exp.mesh, answer_match=c.eval.answer_match)
    metrics = {**result.metrics, **eval_lib.teacher_forced_gates(graphdef, state.params, span_batch, tau,
                                                                 c.bootstrap.noisy_span_scale)}
    return base.with_final_accuracy(metrics, is_final(max(step - 1, 0)))

  return validate


# -------------------------------------------------------------------------------------------------- Stage 2


def grpo_start_params(exp: base.Experiment):
  """GRPO's initial policy and frozen reference: this workdir's bootstrap result, or with `--config.stage=grpo` (no
  bootstrap trained here) `config.init_from`'s when set (its checkpoint `config.init_checkpoint`)."""
  c = exp.config
  if c.get('init_from') and c.stage == 'grpo':
    return base.stage_params(dataclasses.replace(exp, workdir=c.init_from), 'bootstrap', c.init_checkpoint)
  return base.stage_params(exp, 'bootstrap')


def run_grpo(exp: base.Experiment) -> loop.LoopResult:
  c, g = exp.config, exp.config.grpo
  cfg = grpo.GRPOConfig.from_config(g)
  graphdef, start = grpo_start_params(exp)
  train_modules = lora.configured_train_modules(c.get('lora'))
  trained = grads.trained_filter(train_modules)
  own = grpo.reference_params(start, trained)  # the start's trained leaves, None at the frozen base
  reference = own if cfg.beta else None  # only read, never donated; the frozen base is the policy's
  tx = grpo.make_grpo_optimizer(g, train_modules)
  policy = grads.combine(jax.tree.map(jnp.copy, own), start)  # own buffers for the trained leaves: the step donates
  del start                                                     # the state; the frozen base is shared, never updated
  state = base.place_state(exp, state_lib.init_state(policy, tx, seed=c.seed + 1))
  grpo_step = grpo.make_grpo_step(graphdef, tx, cfg, exp.mesh, trained)
  collector = rollout.RolloutCollector(graphdef, cfg, exp.tokenizer, c.dataset.name, exp.mesh,
                                       dict(g.reward_weights), c.eval.answer_match, g.length_reward, g.min_think,
                                       pinned_id(c, exp.vocab), forced_head(c, exp.vocab, 'grpo', 0),
                                       c.model.pin_text)
  prompts = data_lib.prompt_iterator(exp.train, exp.tokenizer, c.data.max_prompt_len, g.prompts_per_step,
                                     seed=c.seed)

  def step_fn(state, batch, tau):
    key = state_lib.step_key(state, salt=1)
    rollout_batch, info = collector.collect(state.params, reference, batch.prompt, batch.prompt_mask, batch.answers,
                                            key, tau)
    state, metrics = grpo_step(state, rollout_batch)
    return state, dict(metrics, reasoning_length=float(np.mean(info['reasoning_length'])),
                       **{f'reward_{k}': float(np.mean(info[k])) for k in ('structure', 'correctness', 'efficiency',
                                                                          'gate', 'total')})

  return base.run_stage(exp, 'grpo', state, step_fn, prompts, make_validate(exp, graphdef, 'grpo'))


# ------------------------------------------------------------------------------------------- decoding, scoring


def run_eval(exp: base.Experiment) -> dict[str, float]:
  """Greedy evaluation of each trained stage of `config.eval.stages` (at `config.eval.checkpoint`) on the records of
  `config.eval` (eval/heldout.py), scored by the reward's answer rule; reports in
  `<workdir>/eval/<split or file>/<stage>/`. Returns the metrics of the last stage evaluated."""
  c = exp.config
  name, records = heldout.eval_records(c, exp.valid)
  prompts = data_lib.build_prompts(records, exp.tokenizer, c.data.max_prompt_len)
  stages = [s for s in c.eval.stages if workdir_lib.checkpoint_steps(os.path.join(exp.workdir, s))]
  if not stages:
    raise FileNotFoundError(f'No checkpoint of {", ".join(c.eval.stages)} in {exp.workdir}: train first '
                            '(--config.stage=pipeline).')
  metrics = {}
  for stage in stages:
    step, why = base.stage_checkpoint(exp, stage, c.eval.checkpoint)
    graphdef, params = base.stage_params(exp, stage, str(step))
    tau = c[stage].tau_min
    gen_cfg, think_budget = decode_config(exp, stage, step, c.eval.budget if c.eval.budget >= 0 else None,
                                          return_hidden=True)
    result = eval_lib.evaluate(nnx.merge(graphdef, params), prompts.prompt, prompts.prompt_mask, prompts.questions,
                               prompts.answers, exp.tokenizer, c.dataset.name, gen_cfg, tau, c.generate.batch_size,
                               exp.mesh, dict(c.grpo.reward_weights), answer_match=c.eval.answer_match,
                               think_budget=think_budget)
    info = {'method': c.method, 'stage': stage, 'step': step, 'split': name, 'config': heldout.config_hash(c),
            'budget': c.eval.budget}
    heldout.stamp(result.rows, **info)
    prefix = f'eval/{name}/{stage}'
    writer = MetricWriter(exp.workdir, c.get('wandb'), c.to_dict())
    writer.write(step, {f'{prefix}/{k}': v for k, v in result.metrics.items()})
    for key, values in (('gate_inner', result.gates['inner']), ('gate_outer', result.gates['outer']),
                        ('reasoning_length', result.reasoning_lengths)):
      writer.histogram(step, f'{prefix}/{key}', values)
    writer.table(step, f'{prefix}/completions', [{**r, 'gates': ' '.join(f'{g:.2f}' for g in r['gates'])}
                                                 for r in result.rows[:64]])
    writer.close()
    if jax.process_index() == 0:
      paths = report.write_report(result, heldout.output_dir(exp.workdir, name, stage, c.eval.checkpoint,
                                                              c.eval.budget),
                                  {**info, 'checkpoint': why, 'tau': tau})
      log.info('Evaluation of %s step %d (%s) on %s, %d examples: %s. Reports: %s', stage, step, why, name,
               len(result.rows), result.metrics, os.path.dirname(paths['metrics.json']))
    metrics = result.metrics
  return metrics


def decode_prompts(exp: base.Experiment, prompts: data_lib.Prompts, stage: str, checkpoint: str = 'best',
                   budget: int | None = None, sampling=None, seed: int = 0, max_new_tokens: int = 0) -> base.Decoded:
  """`Method.decode`: the evaluation's decoding (`run_eval`: the stage's tau_min, gate noise off, the latent lens)
  of `prompts`; `budget`: `<|eot|>` forced after that many span positions (`eval.budget`'s `think_budget`)."""
  c = exp.config
  step, why = base.stage_checkpoint(exp, stage, checkpoint)
  graphdef, params = base.stage_params(exp, stage, str(step))
  gen_cfg, budget = decode_config(exp, stage, step, budget, max_new_tokens, return_hidden=True)
  if sampling is not None:
    gen_cfg = dataclasses.replace(gen_cfg, sampling=sampling)
  model = nnx.merge(graphdef, params)
  out = eval_lib.generate_all(model, prompts.prompt, prompts.prompt_mask, gen_cfg, c[stage].tau_min,
                              c.generate.batch_size, exp.mesh, jax.random.key(seed), think_budget=budget)
  return base.Decoded(stage, step, why, eval_lib.decoded_rows(model, out, exp.tokenizer, extract_answer))

