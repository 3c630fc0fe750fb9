"""COCONUT-style samples and the staged curriculum (seeds 000, 002, 004; COCONUT arXiv:2412.06769 §3, §4).

A record {question, steps, answer} becomes, in model ids, prompt `question\\n` and a completion that depends on
the method and the curriculum stage k (c = thoughts per step):

    coconut           <|bot|> <|latent|> x (k'c) <|eot|> steps[k':] (each + `\\n`) `### answer` <|endoftext|>
    pause_as_thought  the same with <|pause|> in place of <|latent|>
    cot               steps (each + `\\n`) `### answer` <|endoftext|>                 (k ignored)
    no_cot            `### answer` <|endoftext|>                                     (k ignored)
    pause             <|pause|> x (max_stage c) `### answer` <|endoftext|>          (k ignored)

with k' = min(k, number of steps): a record with fewer steps than k has all of them replaced, by k'c thoughts
(COCONUT's data code does the same). The loss covers the text after the latent span (`<|eot|>` excluded), or
after the question / pauses for the baselines; `latent_mask` marks the positions whose input is the previous
position's last hidden state instead of a token embedding (COCONUT's continuous thoughts). Without a curriculum
(COCONUT's "w/o curriculum" ablation) every epoch trains at the last stage.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dtt_jax.tokens import Tokenizer

METHODS = ('coconut', 'pause_as_thought', 'cot', 'no_cot', 'pause')
ANSWER_PREFIX = '### '


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """`config.coconut`: c thoughts per step, stages 0..max_stage, epochs per stage, curriculum on/off."""

  c_thoughts: int = 1
  max_stage: int = 6
  epochs_per_stage: int = 5
  curriculum: bool = True  # False: COCONUT without curriculum (the last stage from the first epoch)

  def __post_init__(self):
    for name in ('c_thoughts', 'epochs_per_stage'):
      if getattr(self, name) < 1:
        raise ValueError(f'config.coconut.{name}={getattr(self, name)} must be >= 1.')
    if self.max_stage < 0:
      raise ValueError(f'config.coconut.max_stage={self.max_stage} must be >= 0.')

  def stage(self, epoch: int) -> int:
    """k = epoch // epochs_per_stage, at most max_stage (always max_stage without a curriculum)."""
    return self.max_stage if not self.curriculum else min(epoch // self.epochs_per_stage, self.max_stage)

  def stage_at_step(self, step: int, steps_per_epoch: int) -> int:
    return self.stage(step // steps_per_epoch)

  def stage_starts(self, steps_per_epoch: int, total_steps: int) -> list[int]:
    """Steps (> 0, < total_steps) at which the stage changes: where COCONUT resets the optimizer state."""
    return [s for s in range(1, total_steps)
            if self.stage_at_step(s, steps_per_epoch) != self.stage_at_step(s - 1, steps_per_epoch)]


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sample in model ids: prompt [P]; completion, loss_mask, latent_mask [T] (int32)."""

  prompt: np.ndarray
  completion: np.ndarray
  loss_mask: np.ndarray
  latent_mask: np.ndarray


def build_sample(record: dict, method: str, stage: int, cfg: Curriculum, tokenizer: Tokenizer) -> Sample:
  """The record laid out for `method` at curriculum stage `stage` (module docstring)."""
  if method not in METHODS:
    raise ValueError(f'config.method={method!r}: expected one of {", ".join(map(repr, METHODS))}.')
  vocab = tokenizer.vocab
  steps = [s.strip() for s in record['steps']]
  answer = tokenizer.encode(ANSWER_PREFIX + record['answer'].strip())
  prompt = tokenizer.encode(record['question'].strip() + '\n')
  if method in ('coconut', 'pause_as_thought'):
    replaced = min(stage, len(steps))
    thought = vocab.latent if method == 'coconut' else vocab.pause
    head = np.array([vocab.bot] + [thought] * (replaced * cfg.c_thoughts) + [vocab.eot], np.int32)
    text = steps[replaced:]
  elif method == 'pause':
    head = np.full(cfg.max_stage * cfg.c_thoughts, vocab.pause, np.int32)
    text = []
  else:
    head = np.zeros(0, np.int32)
    text = steps if method == 'cot' else []
  body = [tokenizer.encode(step + '\n') for step in text]
  tail = np.concatenate(body + [answer, [vocab.eos]]).astype(np.int32)
  completion = np.concatenate([head, tail]).astype(np.int32)
  loss_mask = np.concatenate([np.zeros(len(head), np.int32), np.ones(len(tail), np.int32)])
  latent_mask = (completion == vocab.latent).astype(np.int32) if method == 'coconut' else np.zeros_like(completion)
  return Sample(prompt.astype(np.int32), completion, loss_mask, latent_mask)
