"""COCONUT's training loss, optimizer recipe, step budget and evaluation (seed 004; COCONUT arXiv:2412.06769 §3 and
its official code, facebookresearch/coconut).

Training: COCONUT's n + 1 passes. The sequence prompt + completion is cut before each latent column; each piece runs
through GPT-2 over the KV cache of the pieces before it, and a latent column's input is the last hidden state of
the column before it (no token embedding), so every column is computed once and the gradient flows through the
continuous thoughts. Cross-entropy covers `loss_mask` (the text after the latent span), through the shared output
layer (`model/output_layer.py`: the plain logits, or vocabulary tiles with `fused_output`). The baselines (CoT,
No-CoT, Pause, pause-as-thought) have no latent column: one pass (plain GPT-2). `dropout` > 0 is GPT-2's training
mode (`model.gpt2.Dropout`), its masks drawn from the step's key per sequence column, so they do not depend on how
the sequence is cut into passes and a resumed run draws the same ones.

Optimizer: `config.bootstrap`'s (`state.supervised_optimizer`, the same fields as DTT's bootstrap; the official
recipe is `schedule='constant'`, `decay='all'`, `grad_clip=0`), its state reset every epoch, every stage or never
(`coconut.reset_optimizer`; a warmup + cosine schedule spans the steps between two resets). The reset steps depend
on the schedule only (`Curriculum.reset_steps`): the same for every method of one comparison, except iCoT, which
resets where its removal count grows (`CurriculumBatches.reset_steps`, the official `--reset_optimizer`; a warmup +
cosine then spans one removal interval).

Budget (`train_steps`): `bootstrap.steps` when > 0, else the epochs of `coconut.num_epochs` (0: every stage, the
final one included, gets `epochs_per_stage` epochs) after `start_epoch`; a curriculum run that would stop before
its final stage is a config error.

Evaluation: the head of the method at the stage (`<|bot|>`, k c latents, `<|eot|>`; or pauses) is forced after
the question, the latents fed back as hidden states, then at most `max_new_tokens` greedy tokens to
`<|endoftext|>`; the answer is the text after the last `#` (COCONUT's `split('#')[-1]`), matched `exact`ly
(COCONUT's string equality) or by the dataset's `lenient` rule (`data/answers.py`).
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dtt_jax import parallel
from dtt_jax.data import GENERATED, answers
from dtt_jax.data import coconut as coconut_data
from dtt_jax.eval.compare import example_id
from dtt_jax.eval.evaluate import generate_all, latent_lens
from dtt_jax.model import output_layer
from dtt_jax.model.dtt import DTTModel
from dtt_jax.model.gpt2 import Dropout, causal_bias, kv_cache_for, positions_from_mask
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.tokens import EOS, Tokenizer
from dtt_jax.train import bootstrap
from dtt_jax.train import state as state_lib

FIELDS = ('prompt', 'prompt_mask', 'completion', 'loss_mask', 'latent_mask')
RESETS = {'epoch': 1, 'stage': 0, 'never': 0}  # coconut.reset_optimizer ('stage': epochs_per_stage)


def latent_columns(latent_mask) -> tuple[int, ...]:
  """Completion columns holding a latent in any row; latent_mask [B,T] on the host. COCONUT's layout puts them at
  the same columns in every row of a stage."""
  return tuple(int(c) for c in np.flatnonzero(np.asarray(latent_mask).any(0)))


def head_length(latent_mask) -> int:
  """Completion positions up to and including the last latent of any row (0 without latents)."""
  columns = latent_columns(latent_mask)
  return columns[-1] + 1 if columns else 0


def _completion_hidden(model: DTTModel, batch, columns: tuple[int, ...], dropout: Dropout | None = None):
  """-> hidden [B,T,D] predicting each completion token (position p - 1 + t predicts token t), latents fed back;
  `columns`: `latent_columns(batch['latent_mask'])` (static). One pass per piece [start, next latent column)."""
  prompt, completion, latent = batch['prompt'], batch['completion'], batch['latent_mask']
  p = prompt.shape[1]
  length = p + completion.shape[1]
  x = model.gpt2.embed(jnp.concatenate([prompt, completion], 1))  # [B,S,D]
  mask = jnp.concatenate([batch['prompt_mask'], jnp.ones_like(completion)], axis=1)
  positions, bias = positions_from_mask(mask), causal_bias(mask)  # [B,S], [B,S,S]
  if not columns:
    h, _ = model.gpt2(x, positions, bias, dropout=dropout)
  else:
    starts = [0] + [p + c for c in columns]
    ends = starts[1:] + [length]
    cache = kv_cache_for(model.gpt2.cfg, x.shape[0], ends[0])
    pieces = []
    for start, end in zip(starts, ends):
      piece = x[:, start:end]
      if start:  # a latent column: the previous column's last hidden state where the row has a latent there
        thought = jnp.where(latent[:, start - p, None] > 0, pieces[-1][:, -1], piece[:, 0])
        piece = piece.at[:, 0].set(thought.astype(piece.dtype))
      h_piece, cache = model.gpt2(piece, positions[:, start:end], bias[:, start:end, :end], cache.grow(end), start,
                                  dropout)
      pieces.append(h_piece)
    h = jnp.concatenate(pieces, 1)  # [B,S,D]
  return h[:, p - 1:-1]


def _teacher_forced(model: DTTModel, batch, columns: tuple[int, ...], dropout: Dropout | None = None):
  """-> nll [B,T], correct [B,T] (argmax == target) of the completion with latents fed back, from the plain logits
  (`output_layer.plain_cross_entropy`); `columns` as `_completion_hidden`'s."""
  nll, prediction = output_layer.plain_cross_entropy(model.gpt2, _completion_hidden(model, batch, columns, dropout),
                                                     batch['completion'])
  return nll, prediction == batch['completion']


def coconut_loss(model: DTTModel, batch, key=None, tau=None, counts=None, columns: tuple[int, ...] | None = None,
                 dropout: float = 0.0, fused_output: bool = False, row_groups: int = 1):
  """batch (`data.coconut.build_batch`): prompt, prompt_mask [B,P]; completion, loss_mask, latent_mask [B,T]
  -> (CE summed over loss_mask / counts['loss_mask'] (default: this batch's count), metrics). `key`: the step's
  key, drawing the dropout masks at rate `dropout` (0: none); `tau` is unused (the signature of
  `bootstrap.make_step`'s loss). `columns`: `latent_columns` of the latent mask (computed here when not given,
  which needs concrete arrays). `fused_output`, `row_groups`: `output_layer.cross_entropy`'s `fused` and `groups`
  (False: the plain [B,T,V] logits)."""
  del tau
  count = (counts or bootstrap._counts(batch))['loss_mask']  # pylint: disable=protected-access
  columns = latent_columns(batch['latent_mask']) if columns is None else columns
  drop = None
  if dropout:
    drop = Dropout(key, dropout, batch['prompt'].shape[1] + batch['completion'].shape[1])
  total, prediction = output_layer.cross_entropy(model.gpt2, _completion_hidden(model, batch, columns, drop),
                                                 batch['completion'], batch['loss_mask'], fused_output, row_groups)
  ce = total / count
  correct = prediction == batch['completion']
  return ce, {'loss': ce, 'ce': ce, 'token_accuracy': jnp.sum(correct * batch['loss_mask']) / count}


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh, microbatches: int = 1, dropout: float = 0.0,
                    fused_output: bool = False):
  """-> `train_step(state, batch, tau) -> (state, metrics)` of `coconut_loss`: host batch in, one jitted
  `bootstrap.make_step` per set of latent columns (one per curriculum stage) dispatched on the batch's latent
  mask. The dropout key is the step's (`state_lib.step_key`, folded per microbatch). `fused_output`: the tiled
  output layer (`output_layer.cross_entropy`, one row group per device)."""
  steps = {}

  def train_step(state, batch, tau):
    columns = latent_columns(batch['latent_mask'])
    if columns not in steps:
      loss = functools.partial(coconut_loss, columns=columns, dropout=dropout, fused_output=fused_output,
                               row_groups=parallel.num_shards(mesh))
      steps[columns] = bootstrap.make_step(graphdef, tx, loss, FIELDS, mesh, microbatches)
    return steps[columns](state, parallel.shard_batch({k: batch[k] for k in FIELDS}, mesh), tau)

  return train_step


@functools.partial(jax.jit, static_argnames=('graphdef', 'columns'))
def _teacher_forced_metrics(graphdef, params, batch, columns):
  nll, correct = _teacher_forced(nnx.merge(graphdef, params), batch, columns)
  mask = batch['loss_mask']
  count = jnp.maximum(jnp.sum(mask), 1)
  row_ok = jnp.all(correct | (mask == 0), axis=1)  # every loss token of the row right
  return {'tf_ce': jnp.sum(nll * mask) / count, 'tf_token_accuracy': jnp.sum(correct * mask) / count,
          'tf_sequence_accuracy': jnp.mean(row_ok)}


def teacher_forced_metrics(graphdef, params, batch) -> dict[str, float]:
  """CE, token accuracy and sequence accuracy (all answer-side tokens right) of a `build_batch`, teacher-forced."""
  out = _teacher_forced_metrics(graphdef, params, {k: jnp.asarray(batch[k]) for k in FIELDS},
                                latent_columns(batch['latent_mask']))
  return {k: float(v) for k, v in jax.device_get(out).items()}


# --------------------------------------------------------------------------------------------------------------
# Recipe: optimizer, resets, budget, config checks


def num_epochs(c) -> int:
  """`coconut.num_epochs`, or when 0 the schedule's epochs (every stage, the final one included)."""
  return c.coconut.num_epochs or coconut_data.Curriculum.from_config(c.coconut).schedule_epochs


def follows_curriculum(c) -> bool:
  """Whether the method's layout follows the stage schedule (COCONUT, pause-as-thought and COCONUT w/o thought with
  the curriculum; iCoT's removal depends on the data, `data.coconut.CurriculumBatches`)."""
  return c.method in coconut_data.STEP_CURRICULUM and c.coconut.curriculum


def train_steps(c, cfg: coconut_data.Curriculum, steps_per_epoch: int) -> int:
  """The run's number of steps: `bootstrap.steps` when > 0, else (num_epochs - start_epoch) epochs. A curriculum
  run that would stop before its final stage raises, naming the keys."""
  epochs = num_epochs(c)
  derived = (epochs - cfg.start_epoch) * steps_per_epoch
  steps = c.bootstrap.steps or derived
  last = cfg.last_stage_start(steps_per_epoch)
  if follows_curriculum(c) and steps <= last:
    if c.bootstrap.steps:
      where, fix = (f'config.bootstrap.steps={steps}', f'set config.bootstrap.steps=0 (then num_epochs={epochs}: '
                    f'{derived} steps) or above {last}')
    else:
      where, fix = (f'config.coconut.num_epochs={epochs}',
                    f'set config.coconut.num_epochs above {cfg.schedule_epochs - cfg.epochs_per_stage}')
    raise ValueError(f'{where} ends before the last stage of config.coconut (max_stage={cfg.max_stage}, '
                     f'epochs_per_stage={cfg.epochs_per_stage}, start_epoch={cfg.start_epoch}, {steps_per_epoch} '
                     f'steps per epoch): the final stage, every step latent, starts at step {last}: {fix}.')
  return steps


def reset_every_epochs(c) -> int:
  """Epochs between optimizer resets (`coconut.reset_optimizer`): 1 ('epoch'), epochs_per_stage ('stage'), 0
  ('never')."""
  every = c.coconut.reset_optimizer
  return c.coconut.epochs_per_stage if every == 'stage' else RESETS[every]


def make_optimizer(c, steps_per_epoch: int, total_steps: int, train_modules=()) -> optax.GradientTransformation:
  """`config.bootstrap`'s optimizer (module docstring); a warmup + cosine schedule spans the steps between two
  resets (all steps without resets)."""
  every = reset_every_epochs(c)
  span = every * steps_per_epoch if every else total_steps
  if every and c.method == 'icot':  # reset at every removal
    span = coconut_data.Curriculum.from_config(c.coconut).removal_interval(steps_per_epoch)
  return state_lib.supervised_optimizer(c.bootstrap, span, train_modules)


def resolve_config(c, steps_per_epoch: int, steps: int):
  """A copy of `c` with the run's `bootstrap.steps`, and with `coconut.eval_every_epochs` > 0 its validation and
  checkpoint interval in steps."""
  out = c.copy_and_resolve_references()
  out.bootstrap.steps = steps
  if c.coconut.eval_every_epochs > 0:
    out.bootstrap.eval_every = out.bootstrap.checkpoint_every = c.coconut.eval_every_epochs * steps_per_epoch
  return out


def check_config(c, cfg: coconut_data.Curriculum) -> None:
  """The `config.coconut` checks that need no data; `train_steps` checks the budget again once the epoch length
  is known (`steps_per_epoch=0`: one pass over the records)."""
  def expect(key, value, allowed):
    if value not in allowed:
      raise ValueError(f'config.{key}={value!r}: expected one of {", ".join(map(repr, allowed))}.')
  k = c.coconut
  expect('coconut.reset_optimizer', k.reset_optimizer, tuple(RESETS))
  for key, value in (('bootstrap.steps', c.bootstrap.steps), ('coconut.num_epochs', k.num_epochs),
                     ('coconut.steps_per_epoch', k.steps_per_epoch), ('coconut.eval_every_epochs',
                                                                      k.eval_every_epochs)):
    if value < 0:
      raise ValueError(f'config.{key}={value} must be >= 0.')
  if not 0 <= c.model.get('dropout', 0.0) < 1:
    raise ValueError(f'config.model.dropout={c.model.dropout} must be in [0, 1).')
  if c.method == 'icot' and cfg != coconut_data.Curriculum.from_config(k):
    raise ValueError(f'config.method="icot": the curriculum {cfg} lacks config.coconut.icot_* '
                     f'({coconut_data.Curriculum.from_config(k)}): build it with '
                     'data.coconut.Curriculum.from_config(config.coconut).')
  if k.reset_optimizer == 'stage' and cfg.text_epochs != cfg.epochs_per_stage:
    raise ValueError(f'config.coconut.first_stage_epochs={k.first_stage_epochs} with reset_optimizer="stage": the '
                     f'resets every epochs_per_stage={k.epochs_per_stage} epochs would not fall on the stage starts; '
                     'set first_stage_epochs=0 or coconut.reset_optimizer to "epoch" or "never".')
  if cfg.start_epoch >= num_epochs(c):
    raise ValueError(f'config.coconut.start_epoch={cfg.start_epoch} leaves no epoch of config.coconut.num_epochs='
                     f'{num_epochs(c)}.')
  if cfg.start_epoch and not c.get('init_from') and follows_curriculum(c):
    raise ValueError(f'config.coconut.start_epoch={cfg.start_epoch} skips the first stages (stage 0 is CoT): set '
                     'config.init_from to the workdir of a run that trained them (e.g. --config.method=cot), or set '
                     'config.coconut.start_epoch=0.')
  generated = c.dataset.name in GENERATED
  if (c.eval.split == 'test' or c.eval.path) and c.model.vocab != 'full' and not generated:
    raise ValueError('config.eval.split="test" (or config.eval.path) needs config.model.vocab="full" (the compact '
                     'vocabulary is built from the train and valid records only; the generated addition and prosqa_mini '
                     'share theirs across splits).')
  ids = types.SimpleNamespace(bot=0, eot=0, latent=0, pause=0)  # only the head's length matters here
  longest_head = len(coconut_data.head_tokens(c.method, cfg.max_stage + 1, cfg, ids))
  need = c.data.max_prompt_len + max(c.data.max_completion_len, longest_head + c.generate.max_new_tokens)
  if need > c.model.n_positions:
    raise ValueError(f'config.data.max_prompt_len={c.data.max_prompt_len} + the {longest_head} forced tokens + '
                     f'config.generate.max_new_tokens={c.generate.max_new_tokens} (or data.max_completion_len='
                     f'{c.data.max_completion_len}) need {need} positions; config.model.n_positions='
                     f'{c.model.n_positions}.')
  if k.steps_per_epoch:
    train_steps(c, cfg, k.steps_per_epoch)


# --------------------------------------------------------------------------------------------------------------
# Evaluation


def generate_config(method: str, stage: int, cfg: coconut_data.Curriculum, vocab,
                    max_new_tokens: int, return_hidden: bool = False, budget: int = -1) -> engine.GenerateConfig:
  """Greedy decoding of at most `max_new_tokens` tokens after the forced head of `method` at `stage` (COCONUT
  counts them after it; `budget` >= 0: that many thoughts / pauses, `data.coconut.head_tokens`); gate 1 exactly
  at `<|latent|>`."""
  head = tuple(coconut_data.head_tokens(method, stage, cfg, vocab, budget))
  return engine.GenerateConfig(max_new_tokens=len(head) + max_new_tokens, eos_id=vocab.eos, bot_id=vocab.bot,
                               eot_id=vocab.eot, sampling=SamplingConfig(greedy=True), max_think=0, gate_noise=False,
                               return_hidden=return_hidden, forced_prefix=head, latent_id=vocab.latent)


def answer_of(completion: str) -> str:
  """COCONUT's answer: the text before `<|endoftext|>` after its last `#`, commas removed, stripped."""
  return answers.exact_text(completion.split(EOS, 1)[0].split('#')[-1])


def score(dataset: str, completion: str, reference: str, answer_match: str = 'exact') -> tuple[str, bool]:
  """-> (answer_of(completion), whether it matches `reference` under `answer_match`)."""
  answer = answer_of(completion)
  return answer, answers.match_answer(dataset, answer, reference, answer_match)


def reasoning_tokens(tokens: list[str]) -> int:
  """Generated positions before the answer: everything before the last token holding `#` (COCONUT's answer
  marker), all but `<|endoftext|>` when there is none."""
  marks = [i for i, t in enumerate(tokens) if '#' in t]
  return marks[-1] if marks else len([t for t in tokens if t != EOS])


def evaluate(model, prompts, tokenizer: Tokenizer, dataset: str, gen_cfg: engine.GenerateConfig, batch_size: int,
             mesh, answer_match: str = 'exact') -> tuple[dict[str, float], list[dict]]:
  """`data.samples.Prompts` -> (metrics {accuracy, generated_tokens, reasoning_tokens}, one row per example).
  `generated_tokens`: every position generated up to and including `<|endoftext|>`, the forced head (latents)
  included; `reasoning_tokens`: those before the answer (`reasoning_tokens`). With `gen_cfg.return_hidden`, rows
  carry their tokens and the latent lens of each continuous thought (`eval.evaluate.latent_lens`)."""
  out = generate_all(model, prompts.prompt, prompts.prompt_mask, gen_cfg, 1.0, batch_size, mesh)
  mask = np.asarray(out.mask) > 0
  lens = latent_lens(model, out.hidden_inputs, out.gates, out.mask, tokenizer) if gen_cfg.return_hidden else None
  rows = []
  for i, (question, reference) in enumerate(zip(prompts.questions, prompts.answers)):
    ids = np.asarray(out.tokens[i])[mask[i]]
    tokens = [tokenizer.decode([int(t)]) for t in ids]
    answer, correct = score(dataset, tokenizer.decode(ids), reference, answer_match)
    rows.append({'id': example_id(question), 'question': question, 'completion': tokenizer.decode(ids),
                 'answer': answer, 'reference': reference, 'correct': correct, 'generated_tokens': len(ids),
                 'reasoning_tokens': reasoning_tokens(tokens)})
    if lens is not None:
      rows[-1].update(tokens=tokens, gates=[round(float(g), 4) for g in np.asarray(out.gates[i])[mask[i]]],
                      latent_lens=lens[i])
  metrics = {k: float(np.mean([r[k] for r in rows])) for k in ('correct', 'generated_tokens', 'reasoning_tokens')}
  metrics['accuracy'] = metrics.pop('correct')
  return metrics, rows
