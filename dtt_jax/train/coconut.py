"""COCONUT's training loss and evaluation through the generation engine (seed 004; COCONUT arXiv:2412.06769 §3).

Training: the head of the completion up to its last `<|latent|>` is teacher-forced with the engine's step and KV
cache (`engine.unroll`), the gate forced to 1 at `<|latent|>` positions (the input is exactly the previous
position's last hidden state, no token embedding) and to 0 elsewhere; then one parallel pass over prompt +
completion, with those hidden states as the latent positions' inputs, gives every position's hidden state. This
is COCONUT's n + 1 passes done as a short recurrence (the <= k c + 1 head positions) plus one full pass, with the
gradient through the continuous thoughts. Cross-entropy covers `loss_mask` (the text after the latent span). The
baselines (CoT, No-CoT, Pause, pause-as-thought) have no latent position: the parallel pass alone (plain GPT-2).

Evaluation: the head of the method at the stage (`<|bot|>`, k c latents, `<|eot|>`; or pauses) is forced after
the question, the latents fed back as hidden states, then greedy decoding to `<|endoftext|>`; the answer is the
text after the last `#` (COCONUT's `split('#')[-1]`), checked with the dataset's rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dtt_jax import parallel
from dtt_jax.data import coconut as coconut_data
from dtt_jax.data.answers import check_answer
from dtt_jax.eval.evaluate import generate_all
from dtt_jax.model.dtt import DTTModel
from dtt_jax.model.gpt2 import causal_bias, positions_from_mask
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.tokens import EOS, Tokenizer
from dtt_jax.train import bootstrap

FIELDS = ('prompt', 'prompt_mask', 'completion', 'loss_mask', 'latent_mask')


def head_length(latent_mask) -> int:
  """Completion positions up to and including the last latent of any row (0 without latents); latent_mask [B,T]
  on the host. COCONUT's layout puts them at the same positions in every row of a stage."""
  columns = np.flatnonzero(np.asarray(latent_mask).any(0))
  return int(columns[-1]) + 1 if columns.size else 0


def _teacher_forced(model: DTTModel, batch, head: int):
  """-> nll [B,T], correct [B,T] (argmax == target) of the completion with latents fed back; `head`:
  `head_length(batch['latent_mask'])` (static)."""
  prompt, completion, latent = batch['prompt'], batch['completion'], batch['latent_mask']
  x = model.gpt2.embed(completion)  # [B,T,D]
  if head:
    out = engine.unroll(model, prompt, batch['prompt_mask'], completion[:, :head],
                        jnp.zeros((completion.shape[0], head), jnp.float32), 1.0, forced_gates=latent[:, :head])
    # out.target_hidden[:, t] = h_{t-1}: the input of a latent position t
    x = x.at[:, :head].set(jnp.where(latent[:, :head, None] > 0, out.target_hidden.astype(x.dtype), x[:, :head]))
  mask = jnp.concatenate([batch['prompt_mask'], jnp.ones_like(completion)], axis=1)
  h, _ = model.gpt2(jnp.concatenate([model.gpt2.embed(prompt), x], 1), positions_from_mask(mask), causal_bias(mask))
  p = prompt.shape[1]
  logits = model.gpt2.logits(h[:, p - 1:-1])  # [B,T,V]: position p - 1 + t predicts completion token t
  return optax.softmax_cross_entropy_with_integer_labels(logits, completion), jnp.argmax(logits, -1) == completion


def coconut_loss(model: DTTModel, batch, key=None, tau=None, counts=None, head: int | None = None):
  """batch (`data.coconut.build_batch`): prompt, prompt_mask [B,P]; completion, loss_mask, latent_mask [B,T]
  -> (CE summed over loss_mask / counts['loss_mask'] (default: this batch's count), metrics). `key` and `tau`
  are unused (no gate noise, no temperature): the signature of `bootstrap.make_step`'s loss. `head`:
  `head_length` of the latent mask (computed here when not given, which needs concrete arrays)."""
  del key, tau
  count = (counts or bootstrap._counts(batch))['loss_mask']  # pylint: disable=protected-access
  nll, correct = _teacher_forced(model, batch, head_length(batch['latent_mask']) if head is None else head)
  ce = jnp.sum(nll * batch['loss_mask']) / count
  return ce, {'loss': ce, 'ce': ce, 'token_accuracy': jnp.sum(correct * batch['loss_mask']) / count}


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh, microbatches: int = 1):
  """-> `train_step(state, batch, tau) -> (state, metrics)` of `coconut_loss`: host batch in, one jitted
  `bootstrap.make_step` per head length (one per curriculum stage) dispatched on the batch's latent mask."""
  steps = {}

  def train_step(state, batch, tau):
    head = head_length(batch['latent_mask'])
    if head not in steps:
      steps[head] = bootstrap.make_step(graphdef, tx, functools.partial(coconut_loss, head=head), FIELDS, mesh,
                                        microbatches)
    return steps[head](state, parallel.shard_batch({k: batch[k] for k in FIELDS}, mesh), tau)

  return train_step


@functools.partial(jax.jit, static_argnames=('graphdef', 'head'))
def _teacher_forced_metrics(graphdef, params, batch, head):
  nll, correct = _teacher_forced(nnx.merge(graphdef, params), batch, head)
  mask = batch['loss_mask']
  count = jnp.maximum(jnp.sum(mask), 1)
  row_ok = jnp.all(correct | (mask == 0), axis=1)  # every loss token of the row right
  return {'tf_ce': jnp.sum(nll * mask) / count, 'tf_token_accuracy': jnp.sum(correct * mask) / count,
          'tf_sequence_accuracy': jnp.mean(row_ok)}


def teacher_forced_metrics(graphdef, params, batch) -> dict[str, float]:
  """CE, token accuracy and sequence accuracy (all answer-side tokens right) of a `build_batch`, teacher-forced."""
  out = _teacher_forced_metrics(graphdef, params, {k: jnp.asarray(batch[k]) for k in FIELDS},
                                head_length(batch['latent_mask']))
  return {k: float(v) for k, v in jax.device_get(out).items()}


def generate_config(method: str, stage: int, cfg: coconut_data.Curriculum, vocab,
                    max_new_tokens: int) -> engine.GenerateConfig:
  """Greedy decoding after the forced head of `method` at `stage`; gate 1 exactly at `<|latent|>`."""
  head = tuple(coconut_data.head_tokens(method, stage, cfg, vocab))
  if len(head) >= max_new_tokens:
    raise ValueError(f'generate.max_new_tokens={max_new_tokens} leaves no room after the {len(head)} forced tokens '
                     f'of {method} at stage {stage}.')
  return engine.GenerateConfig(max_new_tokens=max_new_tokens, eos_id=vocab.eos, bot_id=vocab.bot, eot_id=vocab.eot,
                               sampling=SamplingConfig(greedy=True), max_think=0, gate_noise=False,
                               return_hidden=False, forced_prefix=head, latent_id=vocab.latent)


def answer_of(completion: str) -> str:
  """COCONUT's answer: the text before `<|endoftext|>` after its last `#`, commas removed, stripped."""
  return completion.split(EOS, 1)[0].split('#')[-1].replace(',', '').strip()


def evaluate(model, prompts, tokenizer: Tokenizer, dataset: str, gen_cfg: engine.GenerateConfig, batch_size: int,
             mesh) -> tuple[dict[str, float], list[dict]]:
  """`data.samples.Prompts` -> (metrics {accuracy, generated_tokens}, one row per example). `generated_tokens`:
  every position generated up to and including `<|endoftext|>`, the forced head (latents) included."""
  out = generate_all(model, prompts.prompt, prompts.prompt_mask, gen_cfg, 1.0, batch_size, mesh)
  mask = np.asarray(out.mask) > 0
  texts = [tokenizer.decode(row[keep]) for row, keep in zip(np.asarray(out.tokens), mask)]
  rows = []
  for question, reference, text in zip(prompts.questions, prompts.answers, texts):
    answer = answer_of(text)
    rows.append({'question': question, 'completion': text, 'answer': answer, 'reference': reference,
                 'correct': check_answer(dataset, answer, reference)})
  lengths = mask.sum(1)
  return {'accuracy': float(np.mean([r['correct'] for r in rows])), 'generated_tokens': float(lengths.mean())}, rows
