"""How records become the thinking-token method's sequences: the text of a record in model ids (`Texts`), the
teacher's batches of whole texts (`lm_iterator`) and the thinking stage's rollout prefixes (`prefix_iterator`: each
text cut at a position drawn from (seed, epoch, record)).

Both iterators are `BatchIterator`s: endless, resumable, and each process builds only its slice of the global
batch (`process_index` / `process_count`), so a run on several processes sees the rows of a run on one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax
import numpy as np

from dtt_jax import data as data_lib
from dtt_jax import tokens as tokens_lib
from dtt_jax.data import samples as samples_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Texts:
  """Records as model-id text sequences: tokens [N,L] int32 right-padded with eos, lengths [N] (real tokens, the
  final eos included), answer_start [N] (index of the first answer token), indices [N] (of the records kept)."""

  tokens: np.ndarray
  lengths: np.ndarray
  answer_start: np.ndarray
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def max_len(self) -> int:
    return self.tokens.shape[1]

  def take(self, rows) -> Texts:
    rows = np.asarray(rows, np.int64)
    return Texts(self.tokens[rows], self.lengths[rows], self.answer_start[rows], self.indices[rows])

  def mask(self) -> np.ndarray:
    """[N,L] int32, 1 = real token."""
    return (np.arange(self.max_len)[None] < self.lengths[:, None]).astype(np.int32)


def encode_texts(records, tokenizer, max_len: int = 0, with_steps: bool = True) -> Texts:
  """`question\\n` [steps `\\n`] answer `<|endoftext|>` of each record, in model ids. The parts are encoded
  separately (as the compact vocabulary was built). max_len 0: the longest sequence; otherwise longer records are
  dropped (logged; ValueError when none fits)."""
  texts = [data_lib.record_texts(r) for r in records]
  parts = [(q, s if with_steps else '', a) for q, s, a in texts]
  newline = samples_lib.gpt2_ids(tokenizer.hf, ['\n'])[0]
  q_ids, s_ids, a_ids = (samples_lib.gpt2_ids(tokenizer.hf, [part[j] for part in parts]) for j in range(3))
  seqs, starts = [], []
  for q, s, a in zip(q_ids, s_ids, a_ids):
    head = np.concatenate([q, s, newline]) if len(s) else q
    seqs.append(tokenizer.vocab.to_model(np.concatenate([head, a, [tokens_lib.EOS_ID]]).astype(np.int64)))
    starts.append(len(head))
  lengths = np.asarray([len(x) for x in seqs], np.int64)
  width = int(lengths.max(initial=0)) if max_len == 0 else max_len
  keep = np.flatnonzero(lengths <= width)
  if not len(keep):
    raise ValueError(f'None of the {len(seqs)} records fits config.think.max_len={max_len} (they need up to '
                     f'{lengths.max(initial=0)} tokens): raise it, or 0 for the longest.')
  if len(keep) < len(seqs):
    log.warning('think_tokens: dropped %d of %d records longer than config.think.max_len=%d (longest %d).',
                len(seqs) - len(keep), len(seqs), width, lengths.max())
  out = np.full((len(keep), width), tokenizer.vocab.eos, np.int32)
  for row, i in enumerate(keep):
    out[row, :lengths[i]] = seqs[i]
  return Texts(out, lengths[keep], np.asarray(starts, np.int64)[keep], keep.astype(np.int64))


def lm_iterator(texts: Texts, batch_size: int, seed: int = 0, process_index: int = 0,
                process_count: int = 1) -> samples_lib.BatchIterator:
  """Endless resumable teacher batches {'tokens' [B,L], 'mask' [B,L]} (B = this process's rows)."""
  mask = texts.mask()
  return samples_lib.BatchIterator(len(texts), batch_size, lambda rows, epoch: {'tokens': texts.tokens[rows],
                                                                               'mask': mask[rows]},
                                   seed, process_index, process_count)


@flax.struct.dataclass
class PrefixBatch:
  """Rollout prefixes: prefix [B,P] int32 left-padded with eos, prefix_mask [B,P] (1 = real), target [B] (the
  data's token after the prefix)."""

  prefix: Any
  prefix_mask: Any
  target: Any


def draw_cut(seed: int, epoch: int, record_index: int, length: int, answer_start: int, cut: str) -> int:
  """The prefix length c (the prefix is x[:c], the target x[c]) of one example, a function of (seed, epoch, record):
  uniform over [1, length - 1] ('text') or [answer_start, length - 1] ('answer')."""
  low = answer_start if cut == 'answer' else 1
  return int(np.random.default_rng([seed, epoch, record_index, 10]).integers(low, length))


def prefix_batch(texts: Texts, rows, cuts) -> PrefixBatch:
  """Rows of `texts` cut at `cuts` -> PrefixBatch [B,L] (P = L)."""
  width = texts.max_len
  eos = int(texts.tokens[0, texts.lengths[0] - 1])  # every sequence ends with eos
  prefix = np.full((len(rows), width), eos, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  target = np.zeros(len(rows), np.int32)
  for i, (row, c) in enumerate(zip(rows, cuts, strict=True)):
    prefix[i, width - c:] = texts.tokens[row, :c]
    mask[i, width - c:] = 1
    target[i] = texts.tokens[row, c]
  return PrefixBatch(prefix, mask, target)


def prefix_iterator(texts: Texts, batch_size: int, cut: str, seed: int = 0, process_index: int = 0,
                    process_count: int = 1) -> samples_lib.BatchIterator:
  """Endless resumable PrefixBatch iterator (B = this process's rows; each example's cut drawn from (seed, epoch,
  record))."""
  def make(rows, epoch):
    cuts = [draw_cut(seed, epoch, int(texts.indices[r]), int(texts.lengths[r]), int(texts.answer_start[r]), cut)
            for r in rows]
    return prefix_batch(texts, rows, cuts)
  return samples_lib.BatchIterator(len(texts), batch_size, make, seed, process_index, process_count)
