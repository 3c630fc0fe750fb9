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
