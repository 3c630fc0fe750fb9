"""COCONUT and the baselines of its Table 1 (CoT, No-CoT, Pause token, pause as thought, w/o curriculum, w/o
thought) and iCoT: one supervised stage under the stage schedule of `config.coconut`, in `<workdir>/bootstrap/`.

The four parts: the layout of a record at a step (`data/coconut.py`: `CurriculumBatches` turns records into the
method's sequences at the curriculum stage of that step: text steps, latents `<|latent|>`, pauses, iCoT's removed
tokens), the loss (`train/coconut.py`: COCONUT's n + 1 passes with the latents fed back; one pass without
latents), decoding (the method's head forced, then greedy text; `train/coconut.generate_config`) and scoring
(`eval.answer_match`, `train/coconut.score`). The optimizer recipe, the budget and the reset steps are
`train/coconut.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
from flax import nnx

from dtt_jax import data as data_lib
from dtt_jax import parallel
from dtt_jax.data import coconut as coconut_data
from dtt_jax.eval import heldout, report
from dtt_jax.eval.evaluate import decoded_rows, generate_all
from dtt_jax.methods import base
from dtt_jax.model import lora
from dtt_jax.train import coconut as coconut_train
from dtt_jax.train import loop

log = logging.getLogger(__name__)


class CurriculumMethod(base.Method):
  """`config.method` names the layout (one of `data.coconut.METHODS`)."""

  stages = ('bootstrap',)
  uses_dropout = True

  def check_config(self, c) -> None:
    coconut_train.check_config(c, curriculum(c))  # raises on bad values, and on a budget that ends too early

  def vocab_texts(self, c, records):
    del c
    return coconut_data.all_layout_texts(records)

  def train(self, exp: base.Experiment, stage: str) -> loop.LoopResult:
    del stage
    return run_curriculum(exp)

  def evaluate(self, exp: base.Experiment) -> dict[str, float]:
    return run_eval(exp)

  def decode(self, exp, prompts, stage='bootstrap', checkpoint='best', budget=None, sampling=None, seed=0,
             max_new_tokens=0) -> base.Decoded:
    return decode_prompts(exp, prompts, checkpoint, budget, sampling, seed, max_new_tokens)


def curriculum(c) -> coconut_data.Curriculum:
  return coconut_data.Curriculum.from_config(c.coconut)


# ------------------------------------------------------------------------------------------- data, training


def curriculum_batches(exp: base.Experiment, records, batch_size: int) -> coconut_data.CurriculumBatches:
  c = exp.config
  return coconut_data.CurriculumBatches(records, c.method, curriculum(c), exp.tokenizer, batch_size,
                                        c.data.max_prompt_len, c.data.max_completion_len, c.coconut.steps_per_epoch,
                                        seed=c.seed, process_index=jax.process_index(),
                                        process_count=jax.process_count())


def run_curriculum(exp: base.Experiment) -> loop.LoopResult:
  """COCONUT or a baseline (`config.method`) under the schedule of `config.coconut`, in the bootstrap's place (same
  stage directory, loop and checkpoints). The optimizer state restarts at the same steps for every method
  (`Curriculum.reset_steps`; iCoT: where its removal count grows). `config.init_from`: a workdir whose bootstrap
  result (e.g. a CoT run; its checkpoint `config.init_checkpoint`) gives the initial weights."""
  c, b = exp.config, exp.config.bootstrap
  parallel.check_divisible(b.batch_size, exp.mesh, 'bootstrap.batch_size')
  batches = curriculum_batches(exp, exp.train, b.batch_size)
  schedule, per_epoch = curriculum(c), batches.steps_per_epoch
  steps = coconut_train.train_steps(c, schedule, per_epoch)
  exp = dataclasses.replace(exp, config=coconut_train.resolve_config(c, per_epoch, steps))
  tx = coconut_train.make_optimizer(c, per_epoch, steps, lora.configured_train_modules(c.get('lora')))
  resets = set(batches.reset_steps(steps, coconut_train.reset_every_epochs(c)))
  graphdef, state = base.initial_state(exp, tx)
  train_step = coconut_train.make_train_step(graphdef, tx, exp.mesh, b.microbatches, c.model.get('dropout', 0.0))
  log.info('%s: %d steps of %d per epoch from epoch %d; stages start at steps %s; optimizer (%s lr, decay on %s) '
           'resets at %d steps.', c.method, steps, per_epoch, schedule.start_epoch,
           schedule.stage_starts(per_epoch, steps), b.schedule, b.decay, len(resets))

  def step_fn(state, batch, tau):
    step = batches.step - 1  # this batch's step
    if step in resets:
      state = state.replace(opt_state=parallel.shard_state(tx.init(state.params), exp.mesh))
    state, metrics = train_step(state, batch, tau)
    return state, dict(metrics, stage=float(batches.stage(step)), epoch=float(schedule.epoch_at_step(step, per_epoch)))

  return base.run_stage(exp, 'bootstrap', state, step_fn, batches, make_validate(exp, graphdef, batches))


def make_validate(exp: base.Experiment, graphdef, batches: coconut_data.CurriculumBatches):
  """validate(state, step, tau) -> at the stage of the last trained step: greedy accuracy (`eval.answer_match`)
  and generated tokens on the held-out prompts, teacher-forced CE / token / sequence accuracy on the held-out
  samples; `final_accuracy` (the accuracy) only in the method's final layout (`base.FINAL_METRIC`)."""
  c = exp.config
  prompts = base.validation_prompts(exp)
  held_out = coconut_data.fitting_records(exp.valid[:c.dataset.valid_size], c.method, curriculum(c), exp.tokenizer,
                                          c.data.max_prompt_len, c.data.max_completion_len)

  def validate(state, step, tau):
    del tau
    stage = batches.stage(max(step - 1, 0))
    gen_cfg = coconut_train.generate_config(c.method, stage, curriculum(c), exp.vocab, c.generate.max_new_tokens)
    metrics, _ = coconut_train.evaluate(nnx.merge(graphdef, state.params), prompts, exp.tokenizer, c.dataset.name,
                                        gen_cfg, c.generate.batch_size, exp.mesh, c.eval.answer_match)
    batch = coconut_data.build_batch(held_out, c.method, stage, curriculum(c), exp.tokenizer, c.data.max_prompt_len,
                                     c.data.max_completion_len)
    metrics = {'stage': float(stage), **metrics, **coconut_train.teacher_forced_metrics(graphdef, state.params, batch)}
    return base.with_final_accuracy(metrics, batches.is_final(max(step - 1, 0)))

  return validate


# ------------------------------------------------------------------------------------------- decoding, scoring


def run_eval(exp: base.Experiment) -> dict[str, float]:
  """Evaluation of the bootstrap checkpoint `config.eval.checkpoint` (best on validation by default) at the
  curriculum stage it was trained at, on the records of `config.eval`; reports (metrics, rows with latent lens, gate
  plot) in `heldout.output_dir`."""
  c = exp.config
  step, why = base.stage_checkpoint(exp, 'bootstrap', c.eval.checkpoint)
  graphdef, params = base.stage_params(exp, 'bootstrap', str(step))
  stage = curriculum_batches(exp, exp.train, c.bootstrap.batch_size).stage(max(step - 1, 0))
  name, records = heldout.eval_records(c, exp.valid)
  prompts = data_lib.build_prompts(records, exp.tokenizer, c.data.max_prompt_len)
  budget = c.eval.budget
  if budget >= 0 and c.method not in coconut_data.BUDGETED:
    raise ValueError(f'config.eval.budget={budget}: config.method={c.method!r} has no reasoning budget to force '
                     f'(those with one: {", ".join(coconut_data.BUDGETED)}, dtt); set config.eval.budget=-1.')
  gen_cfg = coconut_train.generate_config(c.method, stage, curriculum(c), exp.vocab, c.generate.max_new_tokens,
                                          return_hidden=True, budget=budget)
  metrics, rows = coconut_train.evaluate(nnx.merge(graphdef, params), prompts, exp.tokenizer, c.dataset.name,
                                         gen_cfg, c.generate.batch_size, exp.mesh, c.eval.answer_match)
  info = {'method': c.method, 'stage': 'bootstrap', 'step': step, 'split': name, 'config': heldout.config_hash(c),
          'budget': budget}
  heldout.stamp(rows, **info)
  metrics = {**info, 'checkpoint': why, 'curriculum_stage': stage, 'answer_match': c.eval.answer_match,
             'num_examples': len(rows), **metrics}
  if jax.process_index() == 0:
    out = heldout.output_dir(exp.workdir, name, 'bootstrap', c.eval.checkpoint, budget)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
      json.dump(metrics, f, indent=2)
    with open(os.path.join(out, 'completions.jsonl'), 'w') as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
    if any(r['latent_lens'] for r in rows):
      report.plot_gates_over_tokens(rows, os.path.join(out, 'gates_over_tokens.png'))
    log.info('Evaluation of %s at step %d (%s), curriculum stage %d, on %s (%d examples): %s. Reports: %s',
             c.method, step, why, stage, name, len(rows), metrics, out)
  return metrics


def decode_prompts(exp: base.Experiment, prompts: data_lib.Prompts, checkpoint: str = 'best',
                   budget: int | None = None, sampling=None, seed: int = 0, max_new_tokens: int = 0) -> base.Decoded:
  """`Method.decode` of the bootstrap checkpoint `checkpoint`: the evaluation's decoding (`run_eval`: the head of
  the curriculum stage the checkpoint was trained at, then text). `budget`: the head's thoughts (COCONUT's
  `<|latent|>`, pause-as-thought's `<|pause|>`) or the Pause baseline's pauses, `budget` of them (`eval.budget`)."""
  c = exp.config
  step, why = base.stage_checkpoint(exp, 'bootstrap', checkpoint)
  graphdef, params = base.stage_params(exp, 'bootstrap', str(step))
  stage = curriculum_batches(exp, exp.train, c.bootstrap.batch_size).stage(max(step - 1, 0))
  if budget is not None and c.method not in coconut_data.BUDGETED:
    raise ValueError(f'A budget applies to the methods that force thoughts or pauses '
                     f'({", ".join(coconut_data.BUDGETED)}, dtt); config.method={c.method!r} reasons in text.')
  gen_cfg = coconut_train.generate_config(c.method, stage, curriculum(c), exp.vocab,
                                          max_new_tokens or c.generate.max_new_tokens, return_hidden=True,
                                          budget=-1 if budget is None else budget)
  if sampling is not None:
    gen_cfg = dataclasses.replace(gen_cfg, sampling=sampling)
  model = nnx.merge(graphdef, params)
  out = generate_all(model, prompts.prompt, prompts.prompt_mask, gen_cfg, 1.0, c.generate.batch_size, exp.mesh,
                     jax.random.key(seed))
  rows = decoded_rows(model, out, exp.tokenizer, coconut_train.answer_of)
  return base.Decoded('bootstrap', step, f'{why}; curriculum stage {stage}', rows)

