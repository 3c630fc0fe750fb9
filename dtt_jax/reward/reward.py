"""The composite GRPO reward (SPEC §8), vectorised over a batch of N decoded completions.

Components, each clipped to [-1.5, 1.5]; the total is their weighted sum (weights from the config, default 1.0):
* structure: +0.2 if the completion has exactly one `<|bot|>`, exactly one `<|eot|>`, the `<|eot|>` after the
  `<|bot|>`, and a non-empty answer after it (`extract_answer` of the completion text is not ''), else -1.0.
  Tokens before `<|bot|>` are allowed (they are outer positions).
* correctness: +1.0 if the answer `extract_answer(completion)` matches the reference under `answer_match`
  ('lenient': `check_answer`, the per-dataset rules; 'exact': `answers.match_answer`'s string equality), else -0.5.
* efficiency, `length` = 'flat' (the seed's): -0.01 per inner position (the reasoning length); 'group' (Kimi k1.5's
  length reward, normalised within each group of `group_size` contiguous completions of one prompt):
  lam = 0.5 - (len - min) / (max - min) over the group's reasoning lengths (0 when they are all equal), the
  component lam for a correct answer and min(0, lam) for a wrong one: the shortest correct completion of a group
  gets +0.5, the longest -0.5, and a short wrong answer is never rewarded for its length.
* gate: 0.5 * mean inner gate - 0.2 * mean outer gate, a mean over an empty set being 0.

Inner and outer positions (SPEC §3), the same rule as the generation engine's reasoning-budget counter: the span
opens after the first `<|bot|>` and closes at the first `<|eot|>` after it; inner positions are the real positions
strictly inside it. A span that never closes (no `<|eot|>` after the `<|bot|>`) runs to the end of the
completion, so an unclosed reasoning is charged for every token after `<|bot|>` (the terminating `<|endoftext|>`
included). Without a `<|bot|>` there are no inner positions. Outer positions are all other real positions,
`<|bot|>`/`<|eot|>` themselves included. Only positions with mask 1 count; tokens under mask 0 are ignored.

Never raises on model output: malformed token sequences and any completion text get a defined reward. Gate values
that are not finite (NaN, inf) count as 0; gates are clipped to [0, 1]. Shape mismatches and unknown weight names
or datasets are programming errors and raise ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dtt_jax.data.answers import extract_answer, match_answer, validate_dataset
from dtt_jax.tokens import Tokenizer, Vocab

COMPONENTS = ('structure', 'correctness', 'efficiency', 'gate')
DEFAULT_WEIGHTS = {name: 1.0 for name in COMPONENTS}
CLIP = 1.5
STRUCTURE_OK, STRUCTURE_BAD = 0.2, -1.0
CORRECT, WRONG = 1.0, -0.5
PER_REASONING_TOKEN = -0.01
INNER_GATE_WEIGHT, OUTER_GATE_WEIGHT = 0.5, -0.2
LENGTH_REWARDS = ('flat', 'group')


def span_masks(tokens, mask, vocab: Vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """tokens, mask [N,T] (model ids) -> inner [N,T] bool, outer [N,T] bool, closed [N] bool.

  closed: a real `<|eot|>` follows the first real `<|bot|>` (the span was closed). Rule in the module doc.
  """
  tokens = np.asarray(tokens)
  real = np.asarray(mask) > 0
  is_bot = real & (tokens == vocab.bot)
  opened = (np.cumsum(is_bot, axis=1) - is_bot) > 0  # strictly after the first <|bot|>
  closing = real & opened & (tokens == vocab.eot)
  shut = np.cumsum(closing, axis=1) > 0  # from the first <|eot|> after the <|bot|> on
  inner = real & opened & ~shut
  return inner, real & ~inner, closing.any(axis=1)


def _weights(weights: Mapping[str, float] | None) -> dict[str, float]:
  given = dict(weights) if weights is not None else {}
  unknown = sorted(set(given) - set(COMPONENTS))
  if unknown:
    raise ValueError(f'Unknown reward weight(s) {unknown}; the components are {", ".join(COMPONENTS)}.')
  return {name: float(given.get(name, DEFAULT_WEIGHTS[name])) for name in COMPONENTS}


def _masked_mean(values: np.ndarray, where: np.ndarray) -> np.ndarray:
  """values, where [N,T] -> [N] mean of values over `where`, 0 where the set is empty."""
  count = where.sum(axis=1)
  return np.where(count > 0, (values * where).sum(axis=1) / np.maximum(count, 1), 0.0)


def group_length_reward(lengths: np.ndarray, correct: np.ndarray, group_size: int) -> np.ndarray:
  """lengths, correct [N] (groups of `group_size` contiguous rows) -> [N] Kimi k1.5's length reward (module
  docstring): lam = 0.5 - (len - min) / (max - min) within the group, min(0, lam) for wrong answers."""
  if lengths.shape[0] % group_size:
    raise ValueError(f'{lengths.shape[0]} completions are not whole groups of {group_size}.')
  grouped = lengths.reshape(-1, group_size).astype(np.float64)
  low, high = grouped.min(axis=1, keepdims=True), grouped.max(axis=1, keepdims=True)
  lam = np.where(high > low, 0.5 - (grouped - low) / np.maximum(high - low, 1), 0.0).reshape(-1)
  return np.where(correct, lam, np.minimum(0.0, lam))


def compute_rewards(tokens, mask, gates, completions: Sequence[str], references: Sequence[str], dataset: str,
                    vocab: Vocab, weights: Mapping[str, float] | None = None, answer_match: str = 'lenient',
                    length: str = 'flat', group_size: int = 1) -> dict[str, np.ndarray]:
  """Rewards of N completions.

  Args:
    tokens: [N,T] int completion token ids in the model-id space (`vocab`'s).
    mask: [N,T] 1 for real generated tokens (through the first `<|endoftext|>` inclusive), 0 for padding.
    gates: [N,T] float gate value of each position (the gate that blended that position's input).
    completions: N decoded completion texts, specials included (e.g. `decode_completions`); the answer is
      `extract_answer` of each (SPEC §2).
    references: N reference answers.
    dataset: answer-checking rule, one of `answers.DATASETS`.
    vocab: gives the model ids of `<|bot|>` and `<|eot|>`.
    weights: component name -> weight; missing names weigh 1.0.
    answer_match: 'lenient' | 'exact' (`answers.match_answer`).
    length: the efficiency component, 'flat' | 'group' (module docstring); group_size: the rows of one group.

  Returns:
    [N] arrays: the clipped components `structure`, `correctness`, `efficiency`, `gate` and their weighted sum
    `total` (float32); diagnostics `structure_ok`, `correct`, `has_answer` (bool), `reasoning_length` (inner
    positions), `outer_length`, `completion_length` (real positions), `num_bot`, `num_eot` (int32),
    `inner_gate_mean`, `outer_gate_mean` (float32, 0 for an empty set).
  """
  tokens, mask, gates = np.asarray(tokens), np.asarray(mask), np.asarray(gates, np.float64)
  if tokens.ndim != 2 or mask.shape != tokens.shape or gates.shape != tokens.shape:
    raise ValueError(f'tokens, mask and gates must share one [N,T] shape; got {tokens.shape}, {mask.shape}, '
                     f'{gates.shape}.')
  n = tokens.shape[0]
  if len(completions) != n or len(references) != n:
    raise ValueError(f'{n} token rows but {len(completions)} completions and {len(references)} references.')
  dataset = validate_dataset(dataset)
  weight = _weights(weights)
  if length not in LENGTH_REWARDS:
    raise ValueError(f'Unknown length reward {length!r}; expected one of {", ".join(LENGTH_REWARDS)}.')

  real = mask > 0
  inner, outer, closed = span_masks(tokens, mask, vocab)
  num_bot = (real & (tokens == vocab.bot)).sum(axis=1)
  num_eot = (real & (tokens == vocab.eot)).sum(axis=1)
  answers = [extract_answer(text) for text in completions]
  has_answer = np.array([bool(a) for a in answers], bool).reshape(n)
  correct = np.array([match_answer(dataset, a, r, answer_match) for a, r in zip(answers, references)],
                     bool).reshape(n)
  structure_ok = (num_bot == 1) & (num_eot == 1) & closed & has_answer

  gates = np.clip(np.where(np.isfinite(gates), gates, 0.0), 0.0, 1.0)
  inner_gate_mean = _masked_mean(gates, inner)
  outer_gate_mean = _masked_mean(gates, outer)
  reasoning_length = inner.sum(axis=1)

  components = {
      'structure': np.where(structure_ok, STRUCTURE_OK, STRUCTURE_BAD),
      'correctness': np.where(correct, CORRECT, WRONG),
      'efficiency': (PER_REASONING_TOKEN * reasoning_length if length == 'flat'
                     else group_length_reward(reasoning_length, correct, group_size)),
      'gate': INNER_GATE_WEIGHT * inner_gate_mean + OUTER_GATE_WEIGHT * outer_gate_mean,
  }
  components = {name: np.clip(value, -CLIP, CLIP) for name, value in components.items()}
  total = sum(weight[name] * components[name] for name in COMPONENTS)
  out = {name: value.astype(np.float32) for name, value in components.items()}
  out['total'] = np.asarray(total, np.float32).reshape(n)
  out.update(
      structure_ok=structure_ok, correct=correct, has_answer=has_answer,
      reasoning_length=reasoning_length.astype(np.int32), outer_length=outer.sum(axis=1).astype(np.int32),
      completion_length=real.sum(axis=1).astype(np.int32), num_bot=num_bot.astype(np.int32),
      num_eot=num_eot.astype(np.int32), inner_gate_mean=inner_gate_mean.astype(np.float32),
      outer_gate_mean=outer_gate_mean.astype(np.float32))
  return out


def decode_completions(tokenizer: Tokenizer, tokens, mask) -> list[str]:
  """tokens, mask [N,T] -> N texts of the real tokens, specials included (the `completions` of compute_rewards)."""
  tokens, real = np.asarray(tokens), np.asarray(mask) > 0
  return [tokenizer.decode(row[keep]) for row, keep in zip(tokens, real)]
