"""COCONUT-style samples and the staged curriculum (seeds 000, 002, 004; COCONUT arXiv:2412.06769 §3, §4).

A record {question, steps, answer} becomes, in model ids, prompt `question\\n` and a completion that depends on
the method and the curriculum stage k (c = thoughts per step, K = max_stage):

    coconut           <|bot|> <|latent|> x (n c) <|eot|> steps[k:] (each + `\\n`) `### answer` <|endoftext|>
    pause_as_thought  the same with <|pause|> in place of <|latent|>
    cot               steps (each + `\\n`) `### answer` <|endoftext|>                 (k ignored)
    no_cot            `### answer` <|endoftext|>                                     (k ignored)
    pause             <|pause|> x (K c) `### answer` <|endoftext|>                  (k ignored)

with n = k up to stage K (a record with fewer than k steps loses all of them but still gets k c thoughts), and
past stage K every step removed and n = K (COCONUT's data code with `pad_latent_to_max`, its ProsQA/ProntoQA
setting). The loss covers the text after the latent span (`<|eot|>` excluded), or after the question / pauses for
the baselines; `latent_mask` marks the positions whose input is the previous position's last hidden state instead
of a token embedding (COCONUT's continuous thoughts). Without a curriculum (COCONUT's "w/o curriculum" ablation)
every epoch trains at the final stage K + 1. Evaluation feeds min(k, K) c thoughts after the question.

Step s of a run is in epoch `start_epoch + s // steps_per_epoch` of the schedule (`start_epoch`: COCONUT's
`resume`, epochs skipped, e.g. GSM8K's stage 0 done by a CoT run). Optimizer resets (`reset_steps`) follow the
epochs of the schedule only, never the method's layout, so every method of one comparison resets at the same steps.
"""

from __future__ import annotations

import dataclasses

import logging
from collections.abc import Sequence

import numpy as np

from dtt_jax.data.samples import BatchIterator, model_ids
from dtt_jax.tokens import Tokenizer

log = logging.getLogger(__name__)

METHODS = ('coconut', 'pause_as_thought', 'cot', 'no_cot', 'pause')
ANSWER_PREFIX = '### '


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """`config.coconut`: c thoughts per step, stages 0..max_stage, epochs per stage, curriculum on/off, the first
  epoch of the run."""

  c_thoughts: int = 1
  max_stage: int = 6
  epochs_per_stage: int = 5
  curriculum: bool = True  # False: COCONUT without curriculum (the last stage from the first epoch)
  start_epoch: int = 0  # epoch of the schedule the run starts at (COCONUT's `resume`)

  def __post_init__(self):
    for name in ('c_thoughts', 'epochs_per_stage'):
      if getattr(self, name) < 1:
        raise ValueError(f'config.coconut.{name}={getattr(self, name)} must be >= 1.')
    for name in ('max_stage', 'start_epoch'):
      if getattr(self, name) < 0:
        raise ValueError(f'config.coconut.{name}={getattr(self, name)} must be >= 0.')

  def stage(self, epoch: int) -> int:
    """k = epoch // epochs_per_stage, counted up to max_stage + 1 (every step latent); without a curriculum
    always max_stage + 1."""
    return self.max_stage + 1 if not self.curriculum else min(epoch // self.epochs_per_stage, self.max_stage + 1)

  def thoughts(self, stage: int) -> int:
    """Latent (or pause) positions at `stage`: k c, and K c past the last stage."""
    return min(stage, self.max_stage) * self.c_thoughts

  def epoch_at_step(self, step: int, steps_per_epoch: int) -> int:
    """The schedule's epoch of (0-based) step `step` of the run."""
    return self.start_epoch + step // steps_per_epoch

  def stage_at_step(self, step: int, steps_per_epoch: int) -> int:
    return self.stage(self.epoch_at_step(step, steps_per_epoch))

  def last_stage_start(self, steps_per_epoch: int) -> int:
    """The first step of the final stage K + 1 (every step latent) with the curriculum (<= 0: the run starts in
    it)."""
    return ((self.max_stage + 1) * self.epochs_per_stage - self.start_epoch) * steps_per_epoch

  def reset_steps(self, steps_per_epoch: int, total_steps: int, every_epochs: int) -> list[int]:
    """Steps (> 0, < total_steps) that begin a block of `every_epochs` epochs of the schedule (counted from its
    epoch 0): where the optimizer resets, for every method and with or without the curriculum (0: never)."""
    if every_epochs <= 0:
      return []
    return [s for s in range(steps_per_epoch, total_steps, steps_per_epoch)
            if self.epoch_at_step(s, steps_per_epoch) % every_epochs == 0]

  def stage_starts(self, steps_per_epoch: int, total_steps: int) -> list[int]:
    """Steps (> 0, < total_steps) at which the layout's stage changes."""
    return [s for s in range(1, total_steps)
            if self.stage_at_step(s, steps_per_epoch) != self.stage_at_step(s - 1, steps_per_epoch)]


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sample in model ids: prompt [P]; completion, loss_mask, latent_mask [T] (int32)."""

  prompt: np.ndarray
  completion: np.ndarray
  loss_mask: np.ndarray
  latent_mask: np.ndarray


def layout_texts(record: dict) -> tuple[str, list[str], str]:
  """(`question\\n`, [`step\\n`, ...], `### answer`): the texts every layout encodes, each separately (as COCONUT
  does; the compact vocabulary is built from them)."""
  return (record['question'].strip() + '\n', [s.strip() + '\n' for s in record['steps']],
          ANSWER_PREFIX + record['answer'].strip())


def all_layout_texts(records: Sequence[dict]) -> list[str]:
  """Every text of `layout_texts` of the records (for the compact vocabulary)."""
  return [t for r in records for question, steps, answer in [layout_texts(r)] for t in (question, *steps, answer)]


def check_method(method: str) -> str:
  if method not in METHODS:
    raise ValueError(f'config.method={method!r}: expected one of {", ".join(map(repr, METHODS))}.')
  return method


def head_tokens(method: str, stage: int, cfg: Curriculum, vocab) -> list[int]:
  """The tokens between the question and the text for `method` at `stage`: [<|bot|>, thoughts, <|eot|>],
  pauses, or nothing (also the forced start of generation at evaluation)."""
  if method in ('coconut', 'pause_as_thought'):
    thought = vocab.latent if method == 'coconut' else vocab.pause
    return [vocab.bot] + [thought] * cfg.thoughts(stage) + [vocab.eot]
  return [vocab.pause] * (cfg.max_stage * cfg.c_thoughts) if method == 'pause' else []


def kept_steps(method: str, stage: int, cfg: Curriculum, steps: list) -> list:
  """The steps that stay text: all for CoT, none for No-CoT / Pause, steps[k:] up to the last stage else none."""
  if method in ('coconut', 'pause_as_thought'):
    return steps[stage:] if stage <= cfg.max_stage else []
  return steps if method == 'cot' else []


def build_sample(record: dict, method: str, stage: int, cfg: Curriculum, tokenizer: Tokenizer) -> Sample:
  """The record laid out for `method` at curriculum stage `stage` (module docstring)."""
  check_method(method)
  vocab = tokenizer.vocab
  question, steps, answer = layout_texts(record)
  head = np.array(head_tokens(method, stage, cfg, vocab), np.int32)
  prompt, *tail = model_ids(tokenizer, [question] + kept_steps(method, stage, cfg, steps) + [answer])
  tail = np.concatenate(tail + [[vocab.eos]]).astype(np.int32)
  completion = np.concatenate([head, tail]).astype(np.int32)
  loss_mask = np.concatenate([np.zeros(len(head), np.int32), np.ones(len(tail), np.int32)])
  latent_mask = (completion == vocab.latent).astype(np.int32) if method == 'coconut' else np.zeros_like(completion)
  return Sample(prompt.astype(np.int32), completion, loss_mask, latent_mask)


def build_batch(records, method: str, stage: int, cfg: Curriculum, tokenizer: Tokenizer, max_prompt_len: int,
                max_completion_len: int) -> dict[str, np.ndarray]:
  """Fixed-shape batch of `build_sample`s: prompt, prompt_mask [B,P] left-padded with eos; completion, loss_mask,
  latent_mask [B,T] right-padded (eos, 0, 0). A record that does not fit raises, naming the lengths needed."""
  samples = [build_sample(r, method, stage, cfg, tokenizer) for r in records]
  need_p, need_t = max(len(s.prompt) for s in samples), max(len(s.completion) for s in samples)
  if need_p > max_prompt_len or need_t > max_completion_len:
    raise ValueError(f'A {method} sample at stage {stage} needs data.max_prompt_len >= {need_p} and '
                     f'data.max_completion_len >= {need_t} (configured {max_prompt_len}, {max_completion_len}).')
  eos = tokenizer.vocab.eos
  out = {'prompt': np.full((len(samples), max_prompt_len), eos, np.int32),
         'prompt_mask': np.zeros((len(samples), max_prompt_len), np.int32),
         'completion': np.full((len(samples), max_completion_len), eos, np.int32)}
  out.update({k: np.zeros((len(samples), max_completion_len), np.int32) for k in ('loss_mask', 'latent_mask')})
  for i, s in enumerate(samples):
    out['prompt'][i, max_prompt_len - len(s.prompt):] = s.prompt
    out['prompt_mask'][i, max_prompt_len - len(s.prompt):] = 1
    out['completion'][i, :len(s.completion)] = s.completion
    out['loss_mask'][i, :len(s.completion)] = s.loss_mask
    out['latent_mask'][i, :len(s.completion)] = s.latent_mask
  return out


def fitting_records(records: Sequence[dict], method: str, cfg: Curriculum, tokenizer: Tokenizer,
                    max_prompt_len: int, max_completion_len: int) -> list[dict]:
  """The records whose layout fits the lengths at every stage (the rest dropped with a logged count); an error
  names the lengths needed when none fits."""
  stages = range(cfg.max_stage + 2)
  need_p, need_t, kept = [], [], []
  for r in records:
    question, steps, answer = layout_texts(r)
    lengths = [len(x) for x in model_ids(tokenizer, [question] + steps + [answer])]
    p, step_lens, a = lengths[0], lengths[1:-1], lengths[-1]
    t = max(len(head_tokens(method, k, cfg, tokenizer.vocab)) + sum(kept_steps(method, k, cfg, step_lens)) + a + 1
            for k in stages)
    need_p.append(p)
    need_t.append(t)
    if p <= max_prompt_len and t <= max_completion_len:
      kept.append(r)
  if not kept:
    raise ValueError(f'No {method} sample fits: they need data.max_prompt_len >= {min(need_p)} and '
                     f'data.max_completion_len >= {min(need_t)} (configured {max_prompt_len}, {max_completion_len}).')
  if len(kept) < len(records):
    log.warning('%d of %d records do not fit data.max_prompt_len=%d / data.max_completion_len=%d at some stage and '
                'are dropped (longest: prompt %d, completion %d).', len(records) - len(kept), len(records),
                max_prompt_len, max_completion_len, max(need_p), max(need_t))
  return kept


class CurriculumBatches:
  """Endless, deterministic, resumable `build_batch`es: step s is at stage `cfg.stage_at_step(s, steps_per_epoch)`
  (an "epoch" is `steps_per_epoch` steps; 0 = one pass over the records), rows drawn by `samples.BatchIterator`.

  `stage_changed` is True after `next()` returned the first batch of a new stage."""

  def __init__(self, records: Sequence[dict], method: str, cfg: Curriculum, tokenizer: Tokenizer, batch_size: int,
               max_prompt_len: int, max_completion_len: int, steps_per_epoch: int = 0, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    self.records = fitting_records(records, check_method(method), cfg, tokenizer, max_prompt_len,
                                   max_completion_len)
    self.method, self.cfg, self.tokenizer = method, cfg, tokenizer
    self.lengths = (max_prompt_len, max_completion_len)
    self.rows = BatchIterator(len(self.records), batch_size, lambda rows, epoch: rows, seed, process_index,
                              process_count)
    self.steps_per_epoch = steps_per_epoch or self.rows.batches_per_epoch
    self.step = 0

  def stage(self, step: int) -> int:
    return self.cfg.stage_at_step(step, self.steps_per_epoch)

  @property
  def stage_changed(self) -> bool:
    """Whether the batch last returned (step - 1) is the first of a new stage."""
    return self.step > 1 and self.stage(self.step - 1) != self.stage(self.step - 2)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    stage = self.stage(self.step)
    rows = next(self.rows)
    self.step += 1
    return build_batch([self.records[i] for i in rows], self.method, stage, self.cfg, self.tokenizer, *self.lengths)

  def state(self) -> dict[str, int]:
    return {**self.rows.state(), 'step': self.step}

  def restore(self, state: dict) -> None:
    self.rows.restore(state)
    self.step = int(state['step'])
