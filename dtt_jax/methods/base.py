"""The method interface and what every method's stages share: the experiment, the training loop of a stage, and
restoring a finished stage's parameters.

A method (`Method`) trains its `stages` in order, each in `<workdir>/<stage>/` (checkpoints, best and latest), and
then evaluates. `pipeline.py` only dispatches: `config.stage` 'bootstrap' runs the method's first stage, 'grpo' its
second, 'pipeline' every stage then the evaluation, 'eval' the evaluation alone. A method module keeps its four
parts apart, in this order: how records become training sequences at a given step (its data), the loss and train
step, how it decodes at evaluation, and how the output is scored.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
from typing import Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from dtt_jax import data as data_lib
from dtt_jax import parallel, tokens
from dtt_jax import workdir as workdir_lib
from dtt_jax.checkpoint import Checkpointer
from dtt_jax.metrics import MetricWriter
from dtt_jax.model import build_model, lora
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.train import loop, state as state_lib
from dtt_jax.train.temperature import Temperature

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  tokenizer: tokens.Tokenizer
  train: list[dict]  # records {question, steps, answer}
  valid: list[dict]

  @property
  def vocab(self) -> tokens.Vocab:
    return self.tokenizer.vocab


@dataclasses.dataclass
class Decoded:
  """Prompts decoded by one stage's checkpoint (`Method.decode`)."""
  stage: str
  step: int
  checkpoint: str  # why this checkpoint (e.g. 'best by accuracy of ...')
  rows: list[dict]  # per prompt: completion, answer, tokens; with a gate also gates, latent_lens, forced


class Method(abc.ABC):
  """A training method: `stages` trained in order by `train`, then `evaluate`. Adding a method: a module with a
  subclass, its entry in `methods.REGISTRY`, and a config."""

  stages: tuple[str, ...] = ('bootstrap',)  # the workdir directories of its trained stages, in order
  uses_dropout = False  # whether `config.model.dropout` > 0 applies (GPT-2's training mode)

  def check_config(self, c) -> None:
    """Raises ValueError naming the config key of a value this method cannot use (after the generic checks)."""

  def vocab_texts(self, c, records: Sequence[dict]) -> Sequence[str]:
    """Texts beyond the records' whose tokens the compact vocabulary must hold (e.g. a layout's separators)."""
    del c, records
    return ()

  @abc.abstractmethod
  def train(self, exp: Experiment, stage: str) -> loop.LoopResult:
    """Trains (or resumes) `stage`, one of `stages`, in `<workdir>/<stage>/`."""

  @abc.abstractmethod
  def evaluate(self, exp: Experiment) -> dict[str, float]:
    """Decodes the records of `config.eval` with the trained stages and writes the reports under
    `<workdir>/eval/<split or file>/<stage>/`; returns the metrics of the last stage evaluated."""

  def decode(self, exp: Experiment, prompts: data_lib.Prompts, stage: str, checkpoint: str = 'best',
             budget: int | None = None, sampling: SamplingConfig | None = None, seed: int = 0,
             max_new_tokens: int = 0) -> Decoded:
    """Decodes `prompts` with `stage`'s checkpoint `checkpoint` (see `stage_checkpoint`) as the method's evaluation
    does: greedy, or `sampling` with the key of `seed`; at most `max_new_tokens` generated tokens (0: the config's).
    `budget`: the reasoning forced to end after that many positions (None: as configured); a method with nothing
    to force raises ValueError."""
    raise NotImplementedError(f'{type(self).__name__} does not decode prompts.')

  def config_sections(self, stage: str) -> tuple[str, ...]:
    """The config sections of `stage` among `workdir.STAGE_SECTIONS` (the others' changes do not stop a resume)."""
    return (stage,)

  def stages_to_train(self, config_stage: str) -> tuple[str, ...]:
    """The stages `config.stage` trains: 'bootstrap' the first, 'grpo' the second, 'pipeline' all, 'eval' none."""
    return {'pipeline': self.stages, 'eval': (), 'bootstrap': self.stages[:1], 'grpo': self.stages[1:2]}[config_stage]


# ------------------------------------------------------------------------------------------- shared stage machinery

# Validation metric present only where a method trains its final layout (every step latent / removed; always for a
# method without a curriculum): `best_checkpoint = 'final_accuracy'` ranks only final-layout checkpoints, so the
# checkpoint scored is the final layout's best on validation, as COCONUT's evaluation does.
FINAL_METRIC = 'final_accuracy'


def with_final_accuracy(metrics: dict, final: bool) -> dict:
  """`metrics` plus FINAL_METRIC (= its accuracy) when `final`."""
  return {**metrics, FINAL_METRIC: metrics['accuracy']} if final else metrics


def validation_prompts(exp: Experiment):
  """Held-out prompts of `dataset.valid_size` validation records (left-padded), questions, reference answers."""
  records = exp.valid[:exp.config.dataset.valid_size]
  return data_lib.build_prompts(records, exp.tokenizer, exp.config.data.max_prompt_len)


def initial_state(exp: Experiment, tx):
  """(graphdef, train state) of the stage a run trains first: a fresh model of `config.model`, or with
  `config.init_from` the weights of that workdir's bootstrap checkpoint `config.init_checkpoint` (e.g. a CoT run's),
  with a fresh optimizer; placed on the mesh."""
  c = exp.config
  if c.get('init_from'):
    graphdef, params = stage_params(dataclasses.replace(exp, workdir=c.init_from), 'bootstrap', c.init_checkpoint)
  else:
    graphdef, params = state_lib.split_model(build_model(c.model, exp.vocab, seed=c.seed, lora_cfg=c.get('lora')))
  return graphdef, place_state(exp, state_lib.init_state(params, tx, seed=c.seed))


def place_state(exp: Experiment, state):
  """A train state (host or device arrays) laid out on the mesh by `parallel`'s rule table (`config.parallel.fsdp`
  ways; 1: replicated), with the per-device memory logged."""
  state = parallel.shard_state(state, exp.mesh)
  log.info('%s', parallel.describe_memory(state, exp.mesh))
  return state


def run_stage(exp: Experiment, stage: str, state, step_fn, data, validate, section: str | None = None,
              steps: int | None = None) -> loop.LoopResult:
  """The training loop of a stage in `<workdir>/<stage>/`: checkpoints, metrics, temperature and validation from
  the `config.<section>` section (default: the stage's name); `steps` (default: the section's) overrides it."""
  c = exp.config
  s = c[section or stage]
  steps = s.steps if steps is None else steps
  ckpt = Checkpointer(os.path.join(exp.workdir, stage, 'checkpoints'), keep=s.keep_checkpoints,
                      best_metric=s.get('best_checkpoint'))
  writer = MetricWriter(exp.workdir, c.get('wandb'), c.to_dict())
  temperature = Temperature(s.tau0, s.tau_min, steps, s.patience) if 'tau0' in s else Temperature(1.0, 1.0, steps)
  loop_cfg = loop.LoopConfig(stage, steps, s.log_every, s.eval_every, s.checkpoint_every, s.get('best_metric', ''))
  workdir_lib.record_stage_config(exp.workdir, stage, c)
  try:
    return loop.run(loop_cfg, state, step_fn, data, temperature, ckpt, writer, validate,
                    meta={'vocab': json.loads(exp.vocab.to_json())})
  finally:
    ckpt.close()
    writer.close()


def stage_checkpoint(exp: Experiment, stage: str, which='best') -> tuple[int, str]:
  """(step, why) of a finished stage's checkpoint in the workdir: `which` is 'best' (by
  `config.<stage>.best_checkpoint`; the latest for a stage without one), 'latest' or a step number."""
  best = exp.config[stage].get('best_checkpoint') if stage in exp.config else None
  ckpt = Checkpointer(os.path.join(exp.workdir, stage, 'checkpoints'), async_save=False, best_metric=best)
  try:
    if not ckpt.steps():
      raise FileNotFoundError(f'No {stage} checkpoint in {exp.workdir}/{stage}/checkpoints: run that stage first '
                              '(--config.stage=pipeline) or set config.init_from.')
    return ckpt.choose(which)
  finally:
    ckpt.close()


def stage_params(exp: Experiment, stage: str, which='best', model=None):
  """(graphdef, params) of a finished stage's checkpoint in the workdir (`which`: see `stage_checkpoint`), shaped
  like `model` (default: `config.model` with `config.lora`).

  With `config.lora.enabled` and a checkpoint without adapters (a trained model to fine-tune, e.g. a full bootstrap
  given as `config.init_from`), the checkpoint gives the base and the model keeps its fresh adapters: B = 0, so it
  computes exactly the checkpoint's function. A checkpoint with adapters (a LoRA run) needs the same adapters."""
  if model is None:
    model = build_model(exp.config.model, exp.vocab, seed=exp.config.seed, lora_cfg=exp.config.get('lora'))
  graphdef, params = state_lib.split_model(model)
  step, why = stage_checkpoint(exp, stage, which)
  ckpt = Checkpointer(os.path.join(exp.workdir, stage, 'checkpoints'), async_save=False)
  path = os.path.join(ckpt.directory, str(step))
  saved = lora.adapter_shapes(ocp.PyTreeCheckpointHandler().metadata(epath.Path(path, 'state')).tree['params'])
  wanted = lora.adapter_shapes(params)
  fresh_adapters = bool(wanted) and not saved
  if saved != wanted and not fresh_adapters:
    ckpt.close()
    raise ValueError(f'{path} holds LoRA adapters ({lora.describe_adapters(saved)}) but config.lora gives '
                     f'({lora.describe_adapters(wanted)}): set config.lora.enabled, .rank and .targets as in the run '
                     'that trained it (its workdir\'s config.json).')
  wanted_params = lora.without_adapters(params) if fresh_adapters else params
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), wanted_params,
                          parallel.state_shardings(wanted_params, exp.mesh))  # restored on this mesh's layout
  restored = ckpt.restore_params(step, abstract)
  ckpt.close()
  log.info('Loaded %s parameters from %s: %s.', stage, path, why)
  if fresh_adapters:
    restored = parallel.shard_state(lora.with_adapters(restored, params), exp.mesh)  # restored ones: no copy
    log.info('The checkpoint has no LoRA adapters: fresh ones (%s, B = 0) on its weights.',
             lora.describe_adapters(wanted))
  return graphdef, restored
