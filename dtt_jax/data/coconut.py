"""COCONUT-style samples and the staged curriculum (seeds 000, 002, 004; COCONUT arXiv:2412.06769 §3, §4), with
COCONUT's Table-1 baselines and iCoT (stepwise internalization, Deng et al. 2024, arXiv:2404.05866).

A record {question, steps, answer} becomes, in model ids, prompt `question\\n` and a completion that depends on
the method and the curriculum stage k (c = thoughts per step, K = max_stage):

    coconut             <|bot|> <|latent|> x (n c) <|eot|> steps[k:] (each + `\\n`) `### answer` <|endoftext|>
    pause_as_thought    the same with <|pause|> in place of <|latent|>
    coconut_no_thought  steps[k:] `### answer` <|endoftext|>   (COCONUT "w/o thought": no thought, no marker)
    icot                (steps)[r:] `### answer` <|endoftext|> (the CoT's first r tokens removed; k = r)
    cot                 steps (each + `\\n`) `### answer` <|endoftext|>                 (k ignored)
    no_cot              `### answer` <|endoftext|>                                     (k ignored)
    pause               <|pause|> x (K c) `### answer` <|endoftext|>                  (k ignored)
    dtt                 <|bot|> <|latent|> x L steps[k:] (each + `\n`) <|eot|> answer <|endoftext|>
                        (`span_text='after_eot'`: <|bot|> <|latent|> x L <|eot|> steps[k:] answer <|endoftext|>)
                        (the compressing DTT span, `data.span='curriculum'`: L = k c latent positions as COCONUT's
                        (K c past the last stage), or ceil(m / r) for each replaced step of m tokens with r =
                        `tokens_per_latent`; every other token is a target, the latents only with `latent_targets`
                        (the model emits them itself), else evaluation forces them as COCONUT's head)

with n = k up to stage K (a record with fewer than k steps loses all of them but still gets k c thoughts), and
past stage K every step removed and n = K (COCONUT's data code with `pad_latent_to_max`, its ProsQA/ProntoQA
setting). `coconut_no_thought` is the official `no_thoughts: True` (c_thought 0, `no_special_marker`): the stage
schedule of COCONUT with no thought and no `<|bot|>`/`<|eot|>`, the No-CoT layout past stage K. The loss covers the
text after the latent span (`<|eot|>` excluded), or after the question / pauses for the others; `latent_mask` marks
the positions whose input is the previous position's last hidden state instead of a token embedding (COCONUT's
continuous thoughts; the 'dtt' layout marks its latents too, whose gate `model.pin_latent` pins to 1). Without a
curriculum (COCONUT's "w/o curriculum" ablation) every epoch trains at the final stage K + 1. Evaluation feeds
min(k, K) c thoughts after the question.

Step s of a run is in epoch `start_epoch + s // steps_per_epoch` of the schedule (`start_epoch`: COCONUT's
`resume`, epochs skipped, e.g. GSM8K's stage 0 done by a CoT run). Optimizer resets (`reset_steps`) follow the
epochs of the schedule only, never the method's layout, so every method of one comparison resets at the same steps;
iCoT alone resets where its removal count grows (`CurriculumBatches.reset_steps`), as the official code does.

iCoT (the official train.py of da03/Internalize_CoT_Step_by_Step: `--remove_per_epoch` = `icot_delta`,
`--removal_smoothing_lambda` = `icot_lambda`, `--pretrain_epochs` = `icot_pretrain_epochs`, `--reset_optimizer`,
`--removal_side left`, `--remove_all_when_remove_beyond` = `icot_remove_all_beyond`): the reasoning is the steps'
tokens concatenated (each step + `\\n`, as CoT lays them out). r = (steps since the pretrain epochs) //
round(steps_per_epoch / delta) tokens are scheduled at a step, one more every round(steps_per_epoch / delta) steps
(delta e at the start of epoch e when delta divides steps_per_epoch), all once r reaches `icot_remove_all_beyond`
(> 0), up to the longest CoT of the training records: there every layout is No-CoT and r, the iCoT "stage", stops. A
training row removes r + o tokens, o >= 0 drawn with P(o) = (1 - e^-lambda) e^(-lambda o) truncated at 99 (the
official `compute_lambda_distribution`; lambda = inf: o = 0; o = 0 in the pretrain epochs) by a generator seeded with
(seed, step, record index), so a resumed run draws the same o. Validation and evaluation use r alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from dtt_jax.data.samples import BatchIterator, Stage1Batch, model_ids
from dtt_jax.tokens import Tokenizer

log = logging.getLogger(__name__)

METHODS = ('coconut', 'pause_as_thought', 'cot', 'no_cot', 'pause', 'coconut_no_thought', 'icot')
LAYOUTS = METHODS + ('dtt',)  # 'dtt': the compressing DTT span (methods/dtt.py, data.span='curriculum')
STEP_CURRICULUM = ('coconut', 'pause_as_thought', 'coconut_no_thought', 'dtt')  # steps[k:] at stage k
ANSWER_PREFIX = '### '
MAX_REMOVAL_OFFSET = 99  # the official lambda distribution's truncation (100 values)
ALL_REMOVED = 2 ** 31 - 1  # iCoT's removal count once every CoT token goes
SPAN_TEXT = ('gated', 'embedded', 'after_eot')  # `Curriculum.span_text`
LATENT_HINGE = ('always', 'before_final')  # `Curriculum.latent_hinge`


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """`config.coconut`: c thoughts per step, stages 0..max_stage, epochs per stage (stage 0: `first_stage_epochs`),
  curriculum on/off, the first epoch of the run; iCoT's removal: tokens per epoch, smoothing lambda, epochs before
  the removal starts."""

  c_thoughts: int = 1
  max_stage: int = 6
  epochs_per_stage: int = 5
  first_stage_epochs: int = 0  # epochs of stage 0 (text CoT); 0: epochs_per_stage
  curriculum: bool = True  # False: COCONUT without curriculum (the last stage from the first epoch)
  start_epoch: int = 0  # epoch of the schedule the run starts at (COCONUT's `resume`)
  icot_delta: float = 8.0  # iCoT: CoT tokens removed per epoch (official --remove_per_epoch)
  icot_lambda: float = 4.0  # iCoT: removal smoothing (official --removal_smoothing_lambda); inf: none
  icot_pretrain_epochs: int = 0  # iCoT: epochs of full CoT before the removal starts (official --pretrain_epochs)
  icot_remove_all_beyond: int = 0  # iCoT: all removed once this many are (--remove_all_when_remove_beyond; 0: inf)
  tokens_per_latent: int = 0  # 'dtt' layout: a replaced step of m tokens becomes ceil(m / this) latents (0: c each)
  latent_targets: bool = False  # 'dtt' layout: the latents are targets (the model emits them) or forced (COCONUT's)
  latent_jitter: bool = False  # 'dtt' layout: from stage K on, each row's latent count uniform in [0, K c]
  span_text: str = 'gated'  # 'dtt' layout's kept steps: 'gated' (in the span, the hinge pushing their gate towards
  # 1), 'embedded' (in the span, gate towards 0: token embeddings, as COCONUT feeds them), 'after_eot' (after
  # `<|eot|>`, gate towards 0: COCONUT's arrangement, the span holding the latents alone)
  latent_hinge: str = 'always'  # 'dtt' layout: the hinge pushes the latents' gate towards 1 at every stage
  # ('always') or before the final stage only ('before_final': there the cross-entropy alone sets it)

  def __post_init__(self):
    for name in ('c_thoughts', 'epochs_per_stage'):
      if getattr(self, name) < 1:
        raise ValueError(f'config.coconut.{name}={getattr(self, name)} must be >= 1.')
    for name in ('max_stage', 'first_stage_epochs', 'start_epoch', 'icot_pretrain_epochs', 'icot_remove_all_beyond',
                 'tokens_per_latent'):
      if getattr(self, name) < 0:
        raise ValueError(f'config.coconut.{name}={getattr(self, name)} must be >= 0.')
    for name, allowed in (('span_text', SPAN_TEXT), ('latent_hinge', LATENT_HINGE)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'config.coconut.{name}={getattr(self, name)!r}: expected one of {", ".join(allowed)}.')
    for name in ('icot_delta', 'icot_lambda'):
      if not getattr(self, name) > 0:
        raise ValueError(f'config.coconut.{name}={getattr(self, name)} must be > 0 (icot_lambda=inf: no smoothing).')

  @classmethod
  def from_config(cls, k) -> Curriculum:
    """From the `config.coconut` section (a field it lacks keeps its default)."""
    return cls(**{f.name: k[f.name] for f in dataclasses.fields(cls) if f.name in k})

  @property
  def text_epochs(self) -> int:
    """Epochs of stage 0, the text CoT."""
    return self.first_stage_epochs or self.epochs_per_stage

  @property
  def schedule_epochs(self) -> int:
    """Epochs of the whole schedule: stage 0, stages 1..max_stage and the final stage."""
    return self.text_epochs + (self.max_stage + 1) * self.epochs_per_stage

  def stage(self, epoch: int) -> int:
    """0 for the first `text_epochs` epochs, then one more every epochs_per_stage epochs, counted up to
    max_stage + 1 (every step latent); without a curriculum always max_stage + 1."""
    if not self.curriculum:
      return self.max_stage + 1
    if epoch < self.text_epochs:
      return 0
    return min(1 + (epoch - self.text_epochs) // self.epochs_per_stage, self.max_stage + 1)

  def thoughts(self, stage: int) -> int:
    """Latent (or pause) positions at `stage`: k c, and K c past the last stage."""
    return min(stage, self.max_stage) * self.c_thoughts

  def span_latents(self, step_lengths: Sequence[int], stage: int) -> int:
    """The 'dtt' layout's latent positions at `stage`: COCONUT's k c (`thoughts`, K c past the last stage) with r =
    `tokens_per_latent` = 0; else ceil(m / r) per replaced step of m tokens (the first k steps at stage k <= K, all
    of them after)."""
    r = self.tokens_per_latent
    if not r:
      return self.thoughts(stage)
    replaced = step_lengths[:stage] if stage <= self.max_stage else step_lengths
    return sum(-(-m // r) for m in replaced)

  def jittered_latents(self, seed: int, step: int, record: int, stage: int) -> int | None:
    """The 'dtt' layout's latent count of `record` at `step` with `latent_jitter` from stage K on: uniform in
    [0, K c], drawn from (seed, step, record) (so a resumed run draws the same); None otherwise (the stage's)."""
    if not self.latent_jitter or stage < self.max_stage:
      return None
    return int(np.random.default_rng([seed, step, record, 1]).integers(0, self.thoughts(self.max_stage) + 1))

  def is_final(self, stage: int) -> bool:
    """Whether `stage` (of the step curriculum) is the last of the schedule, every step latent or removed."""
    return stage > self.max_stage

  def epoch_at_step(self, step: int, steps_per_epoch: int) -> int:
    """The schedule's epoch of (0-based) step `step` of the run."""
    return self.start_epoch + step // steps_per_epoch

  def stage_at_step(self, step: int, steps_per_epoch: int) -> int:
    return self.stage(self.epoch_at_step(step, steps_per_epoch))

  def last_stage_start(self, steps_per_epoch: int) -> int:
    """The first step of the final stage K + 1 (every step latent) with the curriculum (<= 0: the run starts in
    it)."""
    return (self.schedule_epochs - self.epochs_per_stage - self.start_epoch) * steps_per_epoch

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

  # iCoT

  def removal_interval(self, steps_per_epoch: int) -> int:
    """iCoT: steps between two removals, round(steps_per_epoch / icot_delta) and at least 1 (the official
    `steps_per_removed_token`; when that rounds to 0 it too removes one a step, from its first step on)."""
    return max(1, int(round(steps_per_epoch / self.icot_delta)))

  def removed_at_step(self, step: int, steps_per_epoch: int) -> int:
    """iCoT: CoT tokens scheduled for removal at step `step` of the run (no smoothing, no cap): one more every
    `removal_interval` steps after the pretrain epochs (epochs counted from the schedule's epoch 0);
    `ALL_REMOVED` from `icot_remove_all_beyond` on."""
    since = (self.start_epoch - self.icot_pretrain_epochs) * steps_per_epoch + step
    removed = max(since, 0) // self.removal_interval(steps_per_epoch)
    return ALL_REMOVED if 0 < self.icot_remove_all_beyond <= removed else removed

  def removal_end(self, tokens: int, steps_per_epoch: int) -> int:
    """iCoT: the first step of the run with `tokens` (or all) scheduled for removal (0 when the run starts past
    it)."""
    tokens = min(tokens, self.icot_remove_all_beyond or tokens)
    since = tokens * self.removal_interval(steps_per_epoch)
    return max(since - (self.start_epoch - self.icot_pretrain_epochs) * steps_per_epoch, 0)

  def removal_offset(self, seed: int, step: int, record: int, steps_per_epoch: int) -> int:
    """iCoT's smoothing: the extra tokens o removed from `record` (an index into the training records) at `step`,
    P(o) = (1 - e^-lambda) e^(-lambda o) truncated at 99, by inverting the geometric CDF of a uniform drawn from
    (seed, step, record); 0 with lambda = inf and in the pretrain epochs."""
    if math.isinf(self.icot_lambda) or self.epoch_at_step(step, steps_per_epoch) < self.icot_pretrain_epochs:
      return 0
    u = np.random.default_rng([seed, step, record]).random()
    return min(int(-math.log1p(-u) / self.icot_lambda), MAX_REMOVAL_OFFSET)


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
  if method not in LAYOUTS:
    raise ValueError(f'config.method={method!r}: expected one of {", ".join(map(repr, METHODS))}.')
  return method


BUDGETED = ('coconut', 'pause_as_thought', 'pause')  # layouts whose head a forced budget resizes (`head_tokens`)


def head_tokens(method: str, stage: int, cfg: Curriculum, vocab, budget: int = -1) -> list[int]:
  """The tokens between the question and the text for `method` at `stage`: [<|bot|>, thoughts, <|eot|>],
  pauses, or nothing (also the forced start of generation at evaluation). `budget` >= 0 (a `BUDGETED` method):
  that many thoughts / pauses instead."""
  if method in ('coconut', 'pause_as_thought'):
    thought = vocab.latent if method == 'coconut' else vocab.pause
    return [vocab.bot] + [thought] * (cfg.thoughts(stage) if budget < 0 else budget) + [vocab.eot]
  if method == 'pause':
    return [vocab.pause] * (cfg.max_stage * cfg.c_thoughts if budget < 0 else budget)
  return []


def kept_steps(method: str, stage: int, cfg: Curriculum, steps: list) -> list:
  """The steps that stay text: all for CoT and iCoT (whose tokens `removed_tokens` then cuts), none for No-CoT /
  Pause, steps[k:] up to the last stage else none for the step curriculum."""
  if method in STEP_CURRICULUM:
    return steps[stage:] if stage <= cfg.max_stage else []
  return steps if method in ('cot', 'icot') else []


def removed_tokens(method: str, stage: int) -> int:
  """Tokens cut from the front of the kept steps' tokens: the stage for iCoT (its removal count), else 0."""
  return stage if method == 'icot' else 0


def build_sample(record: dict, method: str, stage: int, cfg: Curriculum, tokenizer: Tokenizer,
                 latents: int | None = None) -> Sample:
  """The record laid out for `method` at curriculum stage `stage` (module docstring); `latents`: the 'dtt'
  layout's latent count instead of the stage's (`Curriculum.jittered_latents`)."""
  if check_method(method) == 'dtt':
    return _dtt_sample(record, stage, cfg, tokenizer, latents)
  vocab = tokenizer.vocab
  question, steps, answer = layout_texts(record)
  head = np.array(head_tokens(method, stage, cfg, vocab), np.int32)
  prompt, *reasoning, answer_ids = model_ids(tokenizer, [question] + kept_steps(method, stage, cfg, steps) + [answer])
  reasoning = np.concatenate([np.zeros(0, np.int32)] + reasoning)[removed_tokens(method, stage):]
  tail = np.concatenate([reasoning, answer_ids, [vocab.eos]]).astype(np.int32)
  completion = np.concatenate([head, tail]).astype(np.int32)
  loss_mask = np.concatenate([np.zeros(len(head), np.int32), np.ones(len(tail), np.int32)])
  latent_mask = (completion == vocab.latent).astype(np.int32) if method == 'coconut' else np.zeros_like(completion)
  return Sample(prompt.astype(np.int32), completion, loss_mask, latent_mask)


def _dtt_sample(record: dict, stage: int, cfg: Curriculum, tokenizer: Tokenizer, latents: int | None = None
                ) -> Sample:
  """The 'dtt' layout (module docstring): every real completion token is a target, the latents' `<|latent|>` only
  when the model emits them itself (`latent_targets`), and `latent_mask` marks the latents."""
  vocab = tokenizer.vocab
  question, steps, _ = layout_texts(record)
  prompt, *step_ids, answer = model_ids(tokenizer, [question] + steps + [record['answer'].strip()])
  latents = cfg.span_latents([len(x) for x in step_ids], stage) if latents is None else latents
  kept = kept_steps('dtt', stage, cfg, step_ids)
  span, tail = (kept, []) if cfg.span_text != 'after_eot' else ([], kept)
  completion = np.concatenate([[vocab.bot], [vocab.latent] * latents, *span, [vocab.eot], *tail, answer,
                               [vocab.eos]]).astype(np.int32)
  latent = (completion == vocab.latent).astype(np.int32)
  return Sample(prompt.astype(np.int32), completion, 1 - latent * (not cfg.latent_targets), latent)


def build_batch(records, method: str, stage: int | Sequence[int], cfg: Curriculum, tokenizer: Tokenizer,
                max_prompt_len: int, max_completion_len: int, latents=None) -> dict[str, np.ndarray]:
  """Fixed-shape batch of `build_sample`s: prompt, prompt_mask [B,P] left-padded with eos; completion, loss_mask,
  latent_mask [B,T] right-padded (eos, 0, 0). `stage`: one for every record, or one per record (iCoT's smoothed
  removal counts); `latents`: one per record or None ('dtt'). A record that does not fit raises, naming the lengths
  needed."""
  stages = [stage] * len(records) if np.ndim(stage) == 0 else list(stage)
  latents = [None] * len(records) if latents is None else latents
  samples = [build_sample(r, method, k, cfg, tokenizer, n) for r, k, n in zip(records, stages, latents, strict=True)]
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


def stage1_batch(batch: dict[str, np.ndarray], vocab, span_text: str = 'gated',
                 hinge_latents: bool = True) -> Stage1Batch:
  """A 'dtt' layout `build_batch` -> the DTT bootstrap's Stage1Batch [B,P] / [B,T]: its targets (`loss_mask`),
  inner positions strictly between `<|bot|>` (column 0) and the `<|eot|>` (`span_text` 'gated'), else the latents
  alone; no filler. `hinge_latents` False: the latents are in neither hinge term (inner nor outer)."""
  completion, real = batch['completion'], ((batch['loss_mask'] + batch['latent_mask']) > 0).astype(np.int32)
  if span_text != 'gated':
    inner = batch['latent_mask'].astype(np.int32)
  else:
    closed = np.cumsum((completion == vocab.eot) & (real > 0), axis=1) > 0  # from the <|eot|> on
    inner = (real > 0) & ~closed
    inner[:, 0] = False  # <|bot|>
    inner = inner.astype(np.int32)
  free = np.zeros_like(real) if hinge_latents else batch['latent_mask'].astype(np.int32)  # no hinge on their gate
  inner = inner * (1 - free)
  return Stage1Batch(prompt=batch['prompt'], prompt_mask=batch['prompt_mask'], completion=completion,
                     completion_mask=real, loss_mask=batch['loss_mask'], inner_mask=inner,
                     outer_mask=real - inner - free,
                     filler_mask=np.zeros_like(real))


def _lengths(tokenizer: Tokenizer, record: dict) -> tuple[int, list[int], int]:
  """(prompt, [each step], answer) lengths in model ids."""
  question, steps, answer = layout_texts(record)
  lengths = [len(x) for x in model_ids(tokenizer, [question] + steps + [answer])]
  return lengths[0], lengths[1:-1], lengths[-1]


def fitting_records(records: Sequence[dict], method: str, cfg: Curriculum, tokenizer: Tokenizer,
                    max_prompt_len: int, max_completion_len: int) -> list[dict]:
  """The records whose layout fits the lengths at every stage (the rest dropped with a logged count); an error
  names the lengths needed when none fits."""
  stages = range(cfg.max_stage + 2)  # iCoT's longest layout is stage 0 (nothing removed)
  need_p, need_t, kept = [], [], []
  for r in records:
    p, step_lens, a = _lengths(tokenizer, r)
    if method == 'dtt':  # <|bot|> latents steps <|eot|> answer (without `### `) <|endoftext|>
      a = len(model_ids(tokenizer, [r['answer'].strip()])[0]) + 2
      head = lambda k, step_lens=step_lens: 1 + cfg.span_latents(step_lens, k)
    else:
      head = lambda k: len(head_tokens(method, k, cfg, tokenizer.vocab))
    t = max(head(k) + max(sum(kept_steps(method, k, cfg, step_lens)) - removed_tokens(method, k), 0) + a + 1
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
  """Endless, deterministic, resumable `build_batch`es (the 'dtt' layout's as `stage1_batch`es): step s is at
  stage `stage(s)` (an "epoch" is
  `steps_per_epoch` steps; 0 = one pass over the records), rows drawn by `samples.BatchIterator`. The stage is the
  schedule's (`Curriculum.stage_at_step`), for iCoT its removal count (`Curriculum.removed_at_step` up to the
  longest CoT of the records, `cot_tokens`), each row then removing its smoothing offset more.

  `stage_changed` is True after `next()` returned the first batch of a new stage."""

  def __init__(self, records: Sequence[dict], method: str, cfg: Curriculum, tokenizer: Tokenizer, batch_size: int,
               max_prompt_len: int, max_completion_len: int, steps_per_epoch: int = 0, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    self.records = fitting_records(records, check_method(method), cfg, tokenizer, max_prompt_len,
                                   max_completion_len)
    self.method, self.cfg, self.tokenizer, self.seed = method, cfg, tokenizer, seed
    self.lengths = (max_prompt_len, max_completion_len)
    self.rows = BatchIterator(len(self.records), batch_size, lambda rows, epoch: rows, seed, process_index,
                              process_count)
    self.steps_per_epoch = steps_per_epoch or self.rows.batches_per_epoch
    self.cot_tokens = max(sum(_lengths(tokenizer, r)[1]) for r in self.records) if method == 'icot' else 0
    self.step = 0
    if method == 'icot':
      done = cfg.removal_end(self.cot_tokens, self.steps_per_epoch)
      log.info('icot: one more CoT token removed every %d steps; every CoT (up to %d tokens) is removed from step '
               '%d (epoch %d) on.', cfg.removal_interval(self.steps_per_epoch), self.cot_tokens, done,
               cfg.epoch_at_step(done, self.steps_per_epoch))

  def stage(self, step: int) -> int:
    if self.method == 'icot':
      return min(self.cfg.removed_at_step(step, self.steps_per_epoch), self.cot_tokens)
    return self.cfg.stage_at_step(step, self.steps_per_epoch)

  def stage_starts(self, total_steps: int) -> list[int]:
    """Steps (> 0, < total_steps) at which the stage changes."""
    return [s for s in range(1, total_steps) if self.stage(s) != self.stage(s - 1)]

  def reset_steps(self, total_steps: int, every_epochs: int) -> list[int]:
    """Steps (> 0, < total_steps) where the optimizer restarts (`every_epochs` 0: none): iCoT where its removal
    count grows (the official `--reset_optimizer`), the others at the epochs of `Curriculum.reset_steps`."""
    if self.method == 'icot':
      return self.stage_starts(total_steps) if every_epochs > 0 else []
    return self.cfg.reset_steps(self.steps_per_epoch, total_steps, every_epochs)

  def is_final(self, step: int) -> bool:
    """Whether step `step` trains the method's final layout: the schedule's last stage (step curriculum), every CoT
    token removed (iCoT), always for the layouts without a curriculum (CoT, No-CoT, Pause)."""
    if self.method == 'icot':
      return self.stage(step) >= self.cot_tokens
    return self.cfg.is_final(self.stage(step)) if self.method in STEP_CURRICULUM else True

  @property
  def stage_changed(self) -> bool:
    """Whether the batch last returned (step - 1) is the first of a new stage."""
    return self.step > 1 and self.stage(self.step - 1) != self.stage(self.step - 2)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    step, stage = self.step, self.stage(self.step)
    rows = next(self.rows)
    self.step += 1
    latents = None
    if self.method == 'icot':
      stage = [stage + self.cfg.removal_offset(self.seed, step, int(i), self.steps_per_epoch) for i in rows]
    elif self.method == 'dtt' and self.cfg.latent_jitter:
      latents = [self.cfg.jittered_latents(self.seed, step, int(i), stage) for i in rows]
    batch = build_batch([self.records[i] for i in rows], self.method, stage, self.cfg, self.tokenizer, *self.lengths,
                        latents)
    if self.method != 'dtt':
      return batch
    hinged = self.cfg.latent_hinge == 'always' or not self.cfg.is_final(stage)
    return stage1_batch(batch, self.tokenizer.vocab, self.cfg.span_text, hinged)

  def state(self) -> dict[str, int]:
    return {**self.rows.state(), 'step': self.step}

  def restore(self, state: dict) -> None:
    self.rows.restore(state)
    self.step = int(state['step'])
