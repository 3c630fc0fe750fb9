"""Stage-1 samples, Stage-2 prompts, fixed-shape batches and the resumable batch iterator (SPEC §2, §5).

A record {question, steps, answer} becomes, in model ids (`tokens.Tokenizer`):

    prompt      question `\\n`                                      left-padded to P with eos
    completion  `<|bot|>` span `<|eot|>` answer `<|endoftext|>`     right-padded to T with eos

span = 'none' (default): empty, or in `filler_prob` of the samples 1..`max_filler` (uniform) random filler tokens,
drawn uniformly from the non-special model ids (the text tokens of the vocabulary); 'cot': the record's steps
joined by `STEP_SEPARATOR` (`span_text = 'steps'`, default), never filler. Shorter spans for generated addition
(digits separated by spaces, least significant column first): `span_text = 'answer_digits'`, the digits of an
integer answer (`632` -> `2 3 6`); `'column_digits'`, per column the two operand digits and the digit written, then
a final carry (`347 + 285` -> `7 5 2 4 8 3 3 2 6`, `95 + 87` -> `5 7 2 9 8 8 1`); the carries are left to the
latent state. `digit_tokens = True` encodes every digit of the span and the answer as its own token (GPT-2's
single-digit ids; the decoded text is unchanged, so answers are checked as before); the default keeps GPT-2's BPE,
which turns `632` into one token. Prompts always keep the BPE (`build_prompts` sees the text alone).

P and T are fixed by the config, so jit never recompiles; a record whose prompt is longer than P, or whose longest
possible completion (with `max_filler` filler tokens in 'none' mode) is longer than T, is dropped with a logged count,
and an error names the needed lengths when none fits.

`BatchIterator` is deterministic and resumable: epoch e visits the examples in a permutation drawn from (seed, e),
global batch b of the epoch is rows [b*B, (b+1)*B) of it (the last partial batch is skipped), the filler of an
example depends only on (seed, epoch, record index), and process i of p takes rows [i*B/p, (i+1)*B/p) of every
global batch. `state()` is a small JSON-able dict; `restore(state)` makes the next batch what it would have been.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import numpy as np

from dtt_jax.tokens import Tokenizer, Vocab

log = logging.getLogger(__name__)

STEP_SEPARATOR = '\n'  # between steps in a 'cot' span (as COCONUT's CoT data)
SPANS = ('none', 'cot')
SPAN_TEXTS = ('steps', 'answer_digits', 'column_digits')
_DIGIT_PIECES = re.compile(r' ?[0-9]|(?:(?! ?[0-9]).)+', re.S)  # a digit (with its leading space) or a digit-free run
_COLUMN_STEP = re.compile(r'([0-9])\+([0-9])(?:\+[0-9])?=[0-9]+ write ([0-9])(?: carry [0-9])?')  # generators.py's
_CARRY_STEP = re.compile(r'carry ([0-9]) write [0-9]')
BATCH_FIELDS = ('prompt', 'prompt_mask', 'completion', 'completion_mask', 'loss_mask', 'inner_mask', 'outer_mask',
                'filler_mask')


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """The `config.data` section: fixed lengths and the span mode."""

  max_prompt_len: int = 32
  max_completion_len: int = 32
  span: str = 'none'
  filler_prob: float = 0.15
  max_filler: int = 8
  span_text: str = 'steps'  # span = 'cot': 'steps' | 'answer_digits' | 'column_digits'
  digit_tokens: bool = False  # span and answer: one token per digit

  def __post_init__(self):
    if self.span not in SPANS:
      raise ValueError(f'data.span={self.span!r}: expected one of {SPANS}.')
    if self.span_text not in SPAN_TEXTS:
      raise ValueError(f'data.span_text={self.span_text!r}: expected one of {SPAN_TEXTS}.')
    if not 0.0 <= self.filler_prob <= 1.0:
      raise ValueError(f'data.filler_prob={self.filler_prob} must be in [0, 1].')
    if self.max_filler < 1 and self.filler_prob > 0:
      raise ValueError(f'data.max_filler={self.max_filler} must be >= 1 when data.filler_prob > 0.')
    if self.max_prompt_len < 1 or self.max_completion_len < 4:
      raise ValueError(f'data.max_prompt_len={self.max_prompt_len} must be >= 1 and data.max_completion_len='
                       f'{self.max_completion_len} >= 4 (<|bot|> <|eot|> answer <|endoftext|>).')

  @classmethod
  def from_config(cls, c) -> SampleConfig:
    """From a SampleConfig, a `config.data` ConfigDict or a dict (missing keys keep their defaults)."""
    if isinstance(c, cls):
      return c
    return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c})

  @property
  def longest_filler(self) -> int:
    return self.max_filler if self.span == 'none' and self.filler_prob > 0 else 0


@flax.struct.dataclass
class Stage1Batch:
  """A fixed-shape Stage-1 batch of B examples; every field is an int32 numpy (or, sharded, jax) array.

  prompt [B,P] left-padded with eos; prompt_mask [B,P] 1 = real token. completion [B,T] right-padded with eos;
  completion_mask [B,T] 1 = real token, final eos included; loss_mask [B,T] 1 = CE target (real, not filler);
  inner_mask [B,T] strictly between <|bot|> and <|eot|>; outer_mask [B,T] the other real completion positions;
  filler_mask [B,T] injected filler positions (a subset of inner). `batch['prompt']` also works.
  """

  prompt: Any
  prompt_mask: Any
  completion: Any
  completion_mask: Any
  loss_mask: Any
  inner_mask: Any
  outer_mask: Any
  filler_mask: Any

  def __getitem__(self, name: str):
    return getattr(self, name)

  def keys(self) -> tuple[str, ...]:
    return BATCH_FIELDS


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Stage-2 / evaluation prompts: prompt [N,P] int32 left-padded with eos, prompt_mask [N,P] int32 (1 = real),
  the questions and reference answers (N strings each) and indices [N] of the records in the input list."""

  prompt: np.ndarray
  prompt_mask: np.ndarray
  questions: list[str]
  answers: list[str]
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.questions)

  def take(self, rows: Sequence[int] | np.ndarray) -> Prompts:
    rows = np.asarray(rows, np.int64)
    return Prompts(self.prompt[rows], self.prompt_mask[rows], [self.questions[i] for i in rows],
                   [self.answers[i] for i in rows], self.indices[rows])


# ---------------------------------------------------------------------------------------------------------------
# Text and ids

def record_texts(record: dict) -> tuple[str, str, str]:
  """(prompt, span, answer) texts: `question\\n`, the steps joined by STEP_SEPARATOR, the answer."""
  steps = STEP_SEPARATOR.join(s.strip() for s in record['steps'])
  return record['question'].strip() + '\n', steps, record['answer'].strip()


def answer_digits(answer: str, where: str = 'the answer') -> str:
  """`'632'` -> `'2 3 6'`: the digits of an integer answer, least significant first (`data.span_text =
  'answer_digits'`)."""
  text = answer.strip()
  if not text.isdigit() or not text.isascii():
    raise ValueError(f'data.span_text="answer_digits" needs non-negative integer answers; {where} is {answer!r}. '
                     'Use data.span_text="steps" for this dataset.')
  return ' '.join(reversed(text))


def column_digits(steps: Sequence[str], where: str = 'the record') -> str:
  """Generated addition steps (`7+5=12 write 2 carry 1`, ..., `carry 1 write 1`) -> `'7 5 2 ... 1'`: per column
  the two operand digits and the digit written, then the final carry (`data.span_text = 'column_digits'`)."""
  digits = []
  for i, step in enumerate(steps):
    column, carry = _COLUMN_STEP.fullmatch(step.strip()), _CARRY_STEP.fullmatch(step.strip())
    if column:
      digits += column.groups()
    elif carry and i == len(steps) - 1:
      digits.append(carry.group(1))
    else:
      raise ValueError(f'data.span_text="column_digits" needs the steps of generated addition ("7+5=12 write 2 carry '
                       f'1", ..., "carry 1 write 1"); step {i} of {where} is {step!r}. Use data.span_text="steps" '
                       'for this dataset.')
  return ' '.join(digits)


_GPT2_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gpt2_ids(hf_tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
  """Tokenizer (GPT-2) ids [n_i] int32 of each text, without the tokenizer's bos / eos (`Tokenizer.encode_gpt2`),
  memoised per tokenizer (the vocabulary, the batches and the prompts encode the same texts, and long
  ProsQA/ProntoQA questions take seconds to encode)."""
  try:
    cache = _GPT2_CACHE.setdefault(hf_tokenizer, {})
  except TypeError:  # not weak-referenceable
    cache = {}
  for text in dict.fromkeys(texts):
    if text not in cache:
      cache[text] = np.asarray(hf_tokenizer.encode(text, add_special_tokens=False), np.int32)
  return [cache[t] for t in texts]


def compact_vocab(records: Sequence[dict], tokenizer, extra_texts: Sequence[str] = ()) -> Vocab:
  """The compact vocabulary (SPEC §2): every GPT-2 id of the records' prompt, step and answer texts and of
  `extra_texts` (other layouts, e.g. COCONUT's), plus the specials. `tokenizer`: the HF GPT-2 tokenizer (or a
  `Tokenizer`)."""
  hf = tokenizer.hf if isinstance(tokenizer, Tokenizer) else tokenizer
  return Vocab.compact(gpt2_ids(hf, [t for r in records for t in record_texts(r)] + list(extra_texts)))


def filler_token_ids(vocab: Vocab) -> np.ndarray:
  """[K] int32: the model ids of the vocabulary's text tokens (every id but eos, bot, eot, latent, pause and the
  tokenizer's own specials; GPT-2's full vocabulary: 0..50255)."""
  ids = vocab.text_ids()
  if not ids.size:
    raise ValueError('The compact vocabulary has no text tokens to draw filler from.')
  return ids


def model_ids(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
  """Model ids [n_i] of each text (the memoised GPT-2 encoding mapped into the vocabulary)."""
  return [tokenizer.vocab.to_model(ids) for ids in gpt2_ids(tokenizer.hf, texts)]


def digit_gpt2_ids(hf_tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
  """GPT-2 ids [n_i] int32 of each text with every digit its own token (` 12` -> ` 1`, `2`; the rest as GPT-2
  encodes it). Decoding gives the text back unchanged."""
  pieces = [_DIGIT_PIECES.findall(t) for t in texts]
  ids = iter(gpt2_ids(hf_tokenizer, [p for ps in pieces for p in ps]))
  return [np.concatenate([next(ids) for _ in ps]).astype(np.int32) if ps else np.zeros(0, np.int32) for ps in pieces]


# ---------------------------------------------------------------------------------------------------------------
# Stage 1

@dataclasses.dataclass(frozen=True)
class EncodedRecords:
  """Model ids of the records that fit: prompts[i] [p_i], spans[i] [s_i] (the steps; empty unless span='cot'),
  answers[i] [a_i]; indices [N] int64, the position of each in the input record list."""

  prompts: list[np.ndarray]
  spans: list[np.ndarray]
  answers: list[np.ndarray]
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.prompts)


def encode_stage1(records: Sequence[dict], tokenizer: Tokenizer, cfg) -> EncodedRecords:
  """Encodes the records and drops those that do not fit `cfg` (logged; ValueError when none fits)."""
  cfg = SampleConfig.from_config(cfg)
  texts = [record_texts(r) for r in records]
  if cfg.span == 'cot' and cfg.span_text == 'answer_digits':
    texts = [(q, answer_digits(a, f'record {i}\'s answer'), a) for i, (q, _, a) in enumerate(texts)]
  elif cfg.span == 'cot' and cfg.span_text == 'column_digits':
    texts = [(q, column_digits(r['steps'], f'record {i}'), a) for i, (r, (q, _, a)) in enumerate(zip(records, texts))]
  def encode(tok, ts):  # the span and the answer: one token per digit with data.digit_tokens
    if not cfg.digit_tokens:
      return model_ids(tok, ts)
    return [tok.vocab.to_model(ids) for ids in digit_gpt2_ids(tok.hf, ts)]
  prompts = model_ids(tokenizer, [t[0] for t in texts])
  answers = encode(tokenizer, [t[2] for t in texts])
  empty = np.zeros(0, np.int32)
  spans = encode(tokenizer, [t[1] for t in texts]) if cfg.span == 'cot' else [empty] * len(texts)
  completion_lens = [3 + len(s) + cfg.longest_filler + len(a) for s, a in zip(spans, answers)]
  keep = [i for i in range(len(texts))
          if len(prompts[i]) <= cfg.max_prompt_len and completion_lens[i] <= cfg.max_completion_len]
  _report_dropped(len(texts), len(keep), [len(p) for p in prompts], completion_lens, cfg)
  return EncodedRecords([prompts[i] for i in keep], [spans[i] for i in keep], [answers[i] for i in keep],
                        np.asarray(keep, np.int64))


def _report_dropped(total: int, kept: int, prompt_lens: Sequence[int], completion_lens: Sequence[int] | None,
                    cfg: SampleConfig) -> None:
  if kept == total:
    return
  need = f'prompts need up to {max(prompt_lens, default=0)} tokens (max_prompt_len={cfg.max_prompt_len})'
  if completion_lens is not None:
    need += (f', completions up to {max(completion_lens, default=0)} (max_completion_len={cfg.max_completion_len}'
             f'{f", incl. max_filler={cfg.longest_filler}" if cfg.longest_filler else ""})')
  if not kept:
    raise ValueError(f'None of the {total} records fits: {need}. Raise config.data.max_prompt_len / '
                     'max_completion_len.')
  log.warning('Dropped %d of %d records that do not fit: %s.', total - kept, total, need)


def draw_filler(seed: int, epoch: int, record_index: int, cfg: SampleConfig, filler_ids: np.ndarray
                ) -> np.ndarray | None:
  """The filler span [n] of one example (None: no filler), a function of (seed, epoch, record index) only."""
  if cfg.span != 'none' or cfg.filler_prob <= 0:
    return None
  rng = np.random.default_rng([seed, epoch, record_index])
  if rng.random() >= cfg.filler_prob:
    return None
  n = int(rng.integers(1, cfg.max_filler + 1))
  return filler_ids[rng.integers(0, len(filler_ids), n)].astype(np.int32)


def build_stage1_batch(encoded: EncodedRecords, rows: Sequence[int], fillers: Sequence[np.ndarray | None],
                       cfg, vocab: Vocab) -> Stage1Batch:
  """Rows of `encoded` (with the given filler span per row, None = none) -> a Stage1Batch [B,P] / [B,T]."""
  cfg = SampleConfig.from_config(cfg)
  b, p, t = len(rows), cfg.max_prompt_len, cfg.max_completion_len
  eos, bot, eot = vocab.eos, vocab.bot, vocab.eot
  prompt = np.full((b, p), eos, np.int32)
  completion = np.full((b, t), eos, np.int32)
  prompt_mask, completion_mask, inner, filler = (np.zeros((b, n), np.int32) for n in (p, t, t, t))
  for i, (row, fill) in enumerate(zip(rows, fillers, strict=True)):
    ids = encoded.prompts[row]
    prompt[i, p - len(ids):] = ids
    prompt_mask[i, p - len(ids):] = 1
    span = encoded.spans[row] if fill is None else np.asarray(fill, np.int32)
    seq = np.concatenate([[bot], span, [eot], encoded.answers[row], [eos]]).astype(np.int32)
    if len(seq) > t:
      raise ValueError(f'Completion of {len(seq)} tokens does not fit max_completion_len={t}.')
    completion[i, :len(seq)] = seq
    completion_mask[i, :len(seq)] = 1
    inner[i, 1:1 + len(span)] = 1
    if fill is not None:
      filler[i, 1:1 + len(span)] = 1
  return Stage1Batch(prompt=prompt, prompt_mask=prompt_mask, completion=completion, completion_mask=completion_mask,
                     loss_mask=completion_mask - filler, inner_mask=inner, outer_mask=completion_mask - inner,
                     filler_mask=filler)


class BatchIterator:
  """Endless, deterministic, resumable iterator: `next()` -> make_batch(rows, epoch) for this process's rows.

  rows: indices into the `num_examples` examples, [batch_size / process_count] int64.
  """

  def __init__(self, num_examples: int, batch_size: int, make_batch: Callable[[np.ndarray, int], Any],
               seed: int = 0, process_index: int = 0, process_count: int = 1):
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f'batch_size={batch_size} must be positive and divisible by the {process_count} processes.')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} must be in [0, {process_count}).')
    if num_examples < batch_size:
      raise ValueError(f'{num_examples} examples are fewer than one batch of {batch_size}.')
    self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.make_batch = make_batch
    self.epoch, self.batch = 0, 0
    self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)

  @property
  def batches_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  def permutation(self, epoch: int) -> np.ndarray:
    """[num_examples] the visiting order of `epoch`."""
    if epoch != self._perm_epoch:
      self._perm_epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
    return self._perm

  def global_rows(self, epoch: int, batch: int) -> np.ndarray:
    """[batch_size] example indices of global batch `batch` of `epoch`."""
    return self.permutation(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size]

  def local_rows(self, epoch: int, batch: int) -> np.ndarray:
    """[batch_size / process_count] this process's slice of the global batch."""
    per = self.batch_size // self.process_count
    return self.global_rows(epoch, batch)[self.process_index * per:(self.process_index + 1) * per]

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self):
    out = self.make_batch(self.local_rows(self.epoch, self.batch), self.epoch)
    self.batch += 1
    if self.batch == self.batches_per_epoch:
      self.epoch, self.batch = self.epoch + 1, 0
    return out

  def state(self) -> dict[str, int]:
    """The position (JSON-able); the same for every process."""
    return {'epoch': self.epoch, 'batch': self.batch, 'seed': self.seed, 'num_examples': self.num_examples,
            'batch_size': self.batch_size}

  def restore(self, state: dict) -> None:
    """Continue from `state()`; ValueError when the data, batch size or seed differ from the saved run."""
    for key in ('seed', 'num_examples', 'batch_size'):
      if key in state and int(state[key]) != getattr(self, key):
        raise ValueError(f'Cannot resume the data iterator: the checkpoint has {key}={state[key]}, this run '
                         f'{getattr(self, key)} (the data or config changed since the checkpoint).')
    epoch, batch = int(state['epoch']), int(state['batch'])
    if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
      raise ValueError(f'Invalid data iterator state {state}.')
    self.epoch, self.batch = epoch, batch


def stage1_iterator(records: Sequence[dict], tokenizer: Tokenizer, cfg, batch_size: int, seed: int = 0,
                    process_index: int = 0, process_count: int = 1) -> BatchIterator:
  """Endless Stage-1 batches (Stage1Batch of batch_size / process_count rows) over the records that fit `cfg`
  (a `config.data` section or SampleConfig)."""
  cfg = SampleConfig.from_config(cfg)
  encoded = encode_stage1(records, tokenizer, cfg)
  vocab = tokenizer.vocab
  filler_ids = filler_token_ids(vocab)

  def make_batch(rows: np.ndarray, epoch: int) -> Stage1Batch:
    fillers = [draw_filler(seed, epoch, int(encoded.indices[r]), cfg, filler_ids) for r in rows]
    return build_stage1_batch(encoded, rows, fillers, cfg, vocab)

  return BatchIterator(len(encoded), batch_size, make_batch, seed, process_index, process_count)


def stage1_batch(records: Sequence[dict], tokenizer: Tokenizer, cfg, seed: int = 0, epoch: int = 0) -> Stage1Batch:
  """One Stage1Batch [N,P] / [N,T] of every record that fits, in order, with the filler the iterator would draw
  in `epoch` (e.g. a fixed validation batch; N = the number of records that fit)."""
  cfg = SampleConfig.from_config(cfg)
  encoded = encode_stage1(records, tokenizer, cfg)
  filler_ids = filler_token_ids(tokenizer.vocab)
  fillers = [draw_filler(seed, epoch, int(i), cfg, filler_ids) for i in encoded.indices]
  return build_stage1_batch(encoded, range(len(encoded)), fillers, cfg, tokenizer.vocab)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2

def build_prompts(records: Sequence[dict], tokenizer: Tokenizer, max_prompt_len: int) -> Prompts:
  """Prompt-only batch of every record whose `question\\n` fits in max_prompt_len tokens (others dropped, logged)."""
  ids = model_ids(tokenizer, [record_texts(r)[0] for r in records])
  keep = [i for i, x in enumerate(ids) if len(x) <= max_prompt_len]
  _report_dropped(len(ids), len(keep), [len(x) for x in ids], None, SampleConfig(max_prompt_len=max_prompt_len))
  eos = tokenizer.vocab.eos
  prompt = np.full((len(keep), max_prompt_len), eos, np.int32)
  mask = np.zeros((len(keep), max_prompt_len), np.int32)
  for row, i in enumerate(keep):
    prompt[row, max_prompt_len - len(ids[i]):] = ids[i]
    mask[row, max_prompt_len - len(ids[i]):] = 1
  return Prompts(prompt, mask, [records[i]['question'] for i in keep], [records[i]['answer'] for i in keep],
                 np.asarray(keep, np.int64))


def prompt_iterator(records: Sequence[dict], tokenizer: Tokenizer, max_prompt_len: int, batch_size: int,
                    seed: int = 0, process_index: int = 0, process_count: int = 1) -> BatchIterator:
  """Endless Stage-2 batches: Prompts of batch_size / process_count rows, in the same resumable order."""
  prompts = build_prompts(records, tokenizer, max_prompt_len)
  return BatchIterator(len(prompts), batch_size, lambda rows, epoch: prompts.take(rows), seed, process_index,
                       process_count)
