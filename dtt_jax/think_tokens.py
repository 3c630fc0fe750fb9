"""Learned thinking tokens (seed 003, issue #10): `config.method = 'think_tokens'`, settings in `config.think`.

The model is GPT-2 with K extra vocabulary ids `<think_j>` = vocab_rows + j (`GPT2Config.extra_tokens`, model/gpt2.py):
untied input rows `think_in` [K,D] and output rows `think_out` [K,D] + `think_bias` [K]; the text rows stay tied. No
data contains them; the model may emit them anywhere, and reinforcement learning decides what they are for.

Stages, each under the workdir and resumed from its checkpoints (`config.stage`: 'bootstrap' runs the teacher only,
'grpo' and 'pipeline' the teacher (resumed) and the thinking stage, then 'pipeline' also evaluates; 'eval' evaluates
the finished stages):

  teacher/     next-token cross-entropy on each record's text, `question\\n` [steps `\\n`] answer `<|endoftext|>`
               (`think.with_steps`), from `model.init` (scratch or pretrained). Frozen afterwards: it is the reward
               model of 'teacher' mode and the starting point of the policy. `config.init_from` (a workdir with a
               teacher/ stage) replaces it.
  think/       GRPO. Policy = teacher + K fresh thinking rows (think_bias set so that the thinking tokens together
               have probability `init_prob` at the median training position; otherwise no rollout would ever sample
               one). A rollout samples from a text prefix (cut at a random position, `think.cut`) with the thinking
               tokens allowed, at most `max_think` in a row (then the next token must be real). Rewards:
                 'teacher'     the continuation runs until `real_tokens` real tokens (or eos); reward = the frozen
                               teacher's mean log-likelihood of those real tokens given the prefix, thinking tokens
                               removed before scoring. The number of real tokens is fixed so that thinking cannot
                               shorten the scored text. No without-thinking baseline is subtracted: GRPO's
                               group-normalised advantage already removes any per-prefix constant.
                 'next_token'  the seed's alternative ("s rollouts for a sequence of length s, each terminating with a
                               single real token prediction"): thinking tokens until the first real token; reward =
                               the policy's log-likelihood of the data's true next token there (over the real
                               tokens). The final action is "emit a real token" with probability P(real) (its
                               identity is replaced by the data's token), and `ce_weight` * that token's
                               cross-entropy is added as a supervised loss.
               Objective: `rl/grpo.py`'s group-normalised advantages, PPO clip and k3 KL (to the initial policy) and
               its loss aggregation, on the rollout's actions (log-probs re-scored in one parallel forward pass).
  eval/<split>/think/  metrics.json, think_histogram.png, samples.jsonl on the texts of `config.eval` (its size,
               else `think.eval_size` of them): next-token loss without thinking (teacher; policy with thinking
               masked, both teacher-forced) and with thinking (interleaved decoding: before each real token the
               policy may sample thinking tokens, at most `max_think` in a row, which stay in the context; the real
               token is then teacher-forced and scored over the real tokens), the same on the answer tokens,
               thinking-token frequency and the count of each id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dtt_jax import data as data_lib
from dtt_jax import parallel
from dtt_jax import tokens as tokens_lib
from dtt_jax import workdir as workdir_lib
from dtt_jax.checkpoint import Checkpointer
from dtt_jax.data import samples as samples_lib
from dtt_jax.eval import heldout
from dtt_jax.metrics import MetricWriter
from dtt_jax.model import hf_io, output_layer, trunk_config
from dtt_jax.model.dtt import build_trunk
from dtt_jax.model.gpt2 import GPT2, NEG_INF, GPT2Config, causal_bias, kv_cache_for, positions_from_mask
from dtt_jax.rl import grpo
from dtt_jax.sampling.sampler import SamplingConfig, sample
from dtt_jax.train import loop
from dtt_jax.train import state as state_lib
from dtt_jax.train.temperature import Temperature

log = logging.getLogger(__name__)

MODES = ('teacher', 'next_token')
TRAIN = ('all', 'rows')
CUTS = ('text', 'answer')
ROWS = ('think_in', 'think_out', 'think_bias')  # the thinking rows' parameters (top-level keys of the params)
NUM_SAMPLES = 16  # decoded validation texts written to samples.jsonl


def _expect(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'config.think.{key}={value!r}: expected one of {", ".join(map(repr, allowed))}.')


@dataclasses.dataclass(frozen=True)
class ThinkConfig:
  """Static settings of rollouts, rewards and the update (hashable). `from_config(config.think)` builds it."""

  num_tokens: int = 8  # K
  mode: str = 'teacher'
  real_tokens: int = 4  # teacher mode: real tokens per continuation
  max_think: int = 3  # consecutive thinking tokens allowed
  temperature: float = 1.0
  num_generations: int = 8
  beta: float = 0.01
  clip_eps: float = 0.2
  mu: int = 1
  loss_agg: str = 'grpo'
  ce_weight: float = 1.0

  def __post_init__(self):
    _expect('mode', self.mode, MODES)
    _expect('loss_agg', self.loss_agg, grpo.LOSS_AGGREGATIONS)
    for key in ('num_tokens', 'real_tokens', 'mu'):
      if getattr(self, key) < 1:
        raise ValueError(f'config.think.{key}={getattr(self, key)} must be >= 1.')
    if self.max_think < 0:
      raise ValueError(f'config.think.max_think={self.max_think} must be >= 0.')
    if self.num_generations < 2:
      raise ValueError(f'config.think.num_generations={self.num_generations}: a group needs at least 2 rollouts.')
    if self.temperature <= 0:
      raise ValueError(f'config.think.temperature={self.temperature} must be > 0.')

  @classmethod
  def from_config(cls, t) -> ThinkConfig:
    return cls(**{f.name: t[f.name] for f in dataclasses.fields(cls) if f.name in t})

  @property
  def stop_after(self) -> int:
    """Real tokens that end a rollout."""
    return self.real_tokens if self.mode == 'teacher' else 1

  @property
  def rollout_len(self) -> int:
    """N: the most actions a rollout can take (every real token preceded by a full run of thinking tokens)."""
    return self.stop_after * (self.max_think + 1)


def check_config(c) -> ThinkConfig:
  """Value checks of `config.think` (naming the key); -> ThinkConfig."""
  t = c.think
  cfg = ThinkConfig.from_config(t)
  _expect('train', t.train, TRAIN)
  _expect('cut', t.cut, CUTS)
  if not 0.0 < t.init_prob < 1.0:
    raise ValueError(f'config.think.init_prob={t.init_prob} must be in (0, 1).')
  for key in ('batch_size', 'prompts_per_step', 'eval_size'):
    if t[key] < 1:
      raise ValueError(f'config.think.{key}={t[key]} must be positive.')
  for key in ('teacher_steps', 'steps', 'max_len'):
    if t[key] < 0:
      raise ValueError(f'config.think.{key}={t[key]} must be >= 0.')
  return cfg


# ------------------------------------------------------------------------------------------------------ text data


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
  """Endless resumable PrefixBatch iterator (each example's cut drawn from (seed, epoch, record))."""
  def make(rows, epoch):
    cuts = [draw_cut(seed, epoch, int(texts.indices[r]), int(texts.lengths[r]), int(texts.answer_start[r]), cut)
            for r in rows]
    return prefix_batch(texts, rows, cuts)
  return samples_lib.BatchIterator(len(texts), batch_size, make, seed, process_index, process_count)


def lm_iterator(texts: Texts, batch_size: int, seed: int = 0, process_index: int = 0,
                process_count: int = 1) -> samples_lib.BatchIterator:
  """Endless resumable teacher batches {'tokens' [B,L], 'mask' [B,L]}."""
  mask = texts.mask()
  return samples_lib.BatchIterator(len(texts), batch_size, lambda rows, epoch: {'tokens': texts.tokens[rows],
                                                                               'mask': mask[rows]},
                                   seed, process_index, process_count)


# ---------------------------------------------------------------------------------------------------------- model


def build_teacher(c, vocab) -> GPT2:
  """A trunk (either family) without thinking rows from `config.model`: fresh ('scratch') or pretrained weights."""
  m = c.model
  if m.init == 'scratch':
    return build_trunk(trunk_config(m, vocab), nnx.Rngs(c.seed))
  return hf_io.load_model(m.init, vocab=vocab, dtype=m.dtype, seed=c.seed)


def build_policy(teacher_cfg: GPT2Config, teacher_params, num_tokens: int, seed: int, think_bias: float = 0.0):
  """-> (graphdef, params) of the teacher with `num_tokens` fresh thinking rows (normal(0.02)); think_bias set to
  `think_bias`. Every other parameter is the teacher's."""
  model = build_trunk(dataclasses.replace(teacher_cfg, extra_tokens=num_tokens), nnx.Rngs(seed))
  graphdef, params = state_lib.split_model(model)
  rows = {k: params[k] for k in ROWS}
  rows['think_bias'] = jnp.full((num_tokens,), think_bias, jnp.float32)
  return graphdef, {**jax.device_get(teacher_params), **rows}


def forward(model: GPT2, ids, mask) -> jax.Array:
  """ids, mask [B,T] (left- or right-padded) -> final hidden states [B,T,D]."""
  return model(model.embed(ids), positions_from_mask(mask), causal_bias(mask))[0]


def real_logprobs(logits, targets, vocab_rows: int) -> jax.Array:
  """logits [...,V(+K)], targets [...] (real ids) -> log p(target) [...] of the softmax over the real columns only
  (thinking columns excluded): the next-token likelihood of text."""
  lp = jax.nn.log_softmax(logits[..., :vocab_rows].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(lp, targets[..., None].astype(jnp.int32), -1)[..., 0]


def mask_thinking(logits, allowed, vocab_rows: int) -> jax.Array:
  """logits [...,V+K], allowed [...] bool -> the thinking columns set to NEG_INF where not allowed."""
  is_think = jnp.arange(logits.shape[-1]) >= vocab_rows
  return jnp.where(is_think & ~allowed[..., None], NEG_INF, logits)


def action_logprobs(logits, actions, allowed, vocab_rows: int, temperature: float, stop_action: bool) -> jax.Array:
  """logits [...,V+K], actions [...], allowed [...] bool -> log-prob [...] of each action under
  softmax(mask_thinking(logits) / temperature): the token's own, or with `stop_action` (next_token mode) for a real
  token the probability of emitting any real token (the rollout ends there; which one is irrelevant)."""
  lp = jax.nn.log_softmax(mask_thinking(logits.astype(jnp.float32), allowed, vocab_rows) / temperature, axis=-1)
  token_lp = jnp.take_along_axis(lp, actions[..., None].astype(jnp.int32), -1)[..., 0]
  if not stop_action:
    return token_lp
  return jnp.where(actions >= vocab_rows, token_lp, jax.nn.logsumexp(lp[..., :vocab_rows], axis=-1))


def calibrated_bias(real_logits, mask, num_tokens: int, init_prob: float) -> float:
  """real_logits [B,T,V] of the teacher on training text, mask [B,T] -> the thinking bias b with which K thinking
  logits equal to b get total probability `init_prob` at the median position: K e^b / (K e^b + e^lse) = init_prob."""
  lse = np.asarray(jax.nn.logsumexp(real_logits.astype(jnp.float32), axis=-1))[np.asarray(mask) > 0]
  return float(np.median(lse) + np.log(init_prob / (1.0 - init_prob)) - np.log(num_tokens))


# -------------------------------------------------------------------------------------------------------- rollouts


@flax.struct.dataclass
class Rollout:
  """Actions sampled after a prefix, per action position t (all [B,N]); target_logprob [B]."""

  tokens: jax.Array  # int32: thinking ids (>= vocab_rows) or real ids; eos after the rollout ended
  mask: jax.Array  # int32 1 = an action of the rollout
  logprobs: jax.Array  # action log-probs under the sampling policy (0 outside mask)
  allowed: jax.Array  # int32 1 = thinking was allowed at t (the consecutive budget not used up)
  target_logprob: jax.Array  # next_token mode: log p(target) over the real tokens where the rollout ended


def _step_bias(key_bias, index, cache_len: int):
  """key_bias [B,S] -> [B,1,S] additive bias for a query at cache slot `index`."""
  return (key_bias + jnp.where(jnp.arange(cache_len) <= index, 0.0, NEG_INF))[:, None, :]


def generate(model: GPT2, prefix, prefix_mask, key, cfg: ThinkConfig, eos_id: int, targets=None) -> Rollout:
  """prefix, prefix_mask [B,P] (left-padded), targets [B] (next_token mode) -> Rollout of N = cfg.rollout_len
  positions. Thinking tokens (at most max_think in a row) and real tokens are sampled at cfg.temperature; the
  rollout ends after cfg.stop_after real tokens or an eos. In next_token mode the ending real token is recorded as
  `targets` (the data's token) and target_logprob = log p(target) over the real tokens there."""
  b, p = prefix.shape
  n, vr = cfg.rollout_len, model.cfg.vocab_rows
  next_token = cfg.mode == 'next_token'
  targets = jnp.zeros((b,), jnp.int32) if targets is None else targets.astype(jnp.int32)
  cache = kv_cache_for(model.cfg, b, p)
  h, cache = model(model.embed(prefix), positions_from_mask(prefix_mask), causal_bias(prefix_mask), cache, 0)
  cache = cache.grow(p + n)
  key_bias = jnp.concatenate([jnp.where(prefix_mask > 0, 0.0, NEG_INF), jnp.zeros((b, n))], 1)  # [B,P+N]
  num_real = jnp.sum(prefix_mask > 0, axis=-1).astype(jnp.int32)
  sampling = SamplingConfig(temperature=cfg.temperature)
  zeros_i = jnp.zeros((b, n), jnp.int32)
  carry = dict(cache=cache, hidden=h[:, -1], run=jnp.zeros((b,), jnp.int32), n_real=jnp.zeros((b,), jnp.int32),
               done=jnp.zeros((b,), bool), tokens=jnp.full((b, n), eos_id, jnp.int32), mask=zeros_i,
               logprobs=jnp.zeros((b, n), jnp.float32), allowed=zeros_i, target_lp=jnp.zeros((b,), jnp.float32))

  def body(state):
    t, c = state
    logits = model.logits(c['hidden'])  # [B,V+K]
    allowed = c['run'] < cfg.max_think
    token, _ = sample(mask_thinking(logits, allowed, vr), jax.random.fold_in(key, t), sampling)
    live = ~c['done']
    is_think = token >= vr
    stop = live & ~is_think  # a real token
    if next_token:
      token = jnp.where(stop, targets, token)
    token = jnp.where(live, token, eos_id)
    logp = action_logprobs(logits, token, allowed, vr, cfg.temperature, next_token)
    n_real = c['n_real'] + stop
    target_lp = jnp.where(stop, real_logprobs(logits, targets, vr), c['target_lp']) if next_token else c['target_lp']
    done = c['done'] | (stop & ((n_real >= cfg.stop_after) | (token == eos_id)))
    hidden, cache = model(model.embed(token)[:, None], (num_real + t)[:, None], _step_bias(key_bias, p + t, p + n),
                          c['cache'], p + t)
    new = dict(c, cache=cache, hidden=hidden[:, 0], run=jnp.where(is_think & live, c['run'] + 1, 0), n_real=n_real,
               done=done, target_lp=target_lp)
    record = dict(tokens=token, mask=live, logprobs=jnp.where(live, logp, 0.0), allowed=allowed & live)
    for name, value in record.items():
      new[name] = jax.lax.dynamic_update_index_in_dim(c[name], value.astype(c[name].dtype), t, axis=1)
    return t + 1, new

  _, c = jax.lax.while_loop(lambda s: (s[0] < n) & ~jnp.all(s[1]['done']), body, (jnp.int32(0), carry))
  return Rollout(c['tokens'], c['mask'], c['logprobs'], c['allowed'], c['target_lp'])


def rollout_logits(model: GPT2, prefix, prefix_mask, actions) -> jax.Array:
  """One parallel pass over prefix [B,P] + actions [B,N] -> the logits [B,N,V+K] that chose each action."""
  p, n = prefix.shape[1], actions.shape[1]
  ids = jnp.concatenate([prefix, actions], axis=1)
  mask = jnp.concatenate([prefix_mask, jnp.ones_like(actions)], axis=1)
  return model.logits(forward(model, ids, mask)[:, p - 1:p + n - 1])


def teacher_reward(teacher: GPT2, prefix, prefix_mask, actions, action_mask) -> jax.Array:
  """The frozen teacher's mean log-likelihood of the rollout's real tokens given the prefix, thinking tokens
  removed first: prefix, prefix_mask [B,P], actions, action_mask [B,N] -> [B] (0 for a rollout without real
  tokens). The real tokens are moved to the front (order kept) and scored right after the left-padded prefix."""
  vr, p, n = teacher.cfg.vocab_rows, prefix.shape[1], actions.shape[1]
  real = (action_mask > 0) & (actions < vr)  # [B,N]
  order = jnp.argsort(~real, axis=1, stable=True)
  kept_mask = jnp.take_along_axis(real, order, 1)
  kept = jnp.where(kept_mask, jnp.take_along_axis(actions, order, 1), 0)  # [B,N] real tokens first
  ids = jnp.concatenate([prefix, kept], axis=1)
  mask = jnp.concatenate([prefix_mask, kept_mask.astype(prefix_mask.dtype)], axis=1)
  hidden = forward(teacher, ids, mask)[:, p - 1:p + n - 1]  # [B,N,D]
  lp, _ = output_layer.token_logprobs(teacher, hidden, kept, fused=False)  # [B,N] over the real columns
  count = jnp.sum(kept_mask, axis=1)
  return jnp.sum(jnp.where(kept_mask, lp, 0.0), axis=1) / jnp.maximum(count, 1)


# ----------------------------------------------------------------------------------------------------- the update


def think_loss(params, graphdef, roll: Rollout, prefix, prefix_mask, advantages, ref_logprobs, old_logprobs, first,
               cfg: ThinkConfig):
  """GRPO objective of one rollout batch (rl/grpo.py's clip, k3 KL and aggregation) -> (loss, (aux, logprobs)).

  roll [N,T]; advantages [N]; ref_logprobs, old_logprobs [N,T] (old ignored when `first`: this pass's own values,
  stop-gradient, so the first iteration's ratio is 1). next_token mode adds ce_weight * CE of the data token at each
  rollout's final (real) action."""
  model = nnx.merge(graphdef, params)
  vr = model.cfg.vocab_rows
  next_token = cfg.mode == 'next_token'
  logits = rollout_logits(model, prefix, prefix_mask, roll.tokens)  # [N,T,V+K]
  logp = action_logprobs(logits, roll.tokens, roll.allowed > 0, vr, cfg.temperature, next_token)
  old = jnp.where(first, jax.lax.stop_gradient(logp), old_logprobs)
  ratio = jnp.exp(logp - old)
  adv = advantages[:, None]
  per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv)
  kl = grpo.k3_kl(logp, ref_logprobs)
  if cfg.beta:
    per_token = per_token + cfg.beta * kl
  mask = roll.mask.astype(jnp.float32)
  loss = grpo.aggregate(per_token, mask, cfg.loss_agg)
  mean = lambda x, m=mask: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
  clipped = ((ratio < 1.0 - cfg.clip_eps) & (adv < 0)) | ((ratio > 1.0 + cfg.clip_eps) & (adv > 0))
  aux = {'pg_loss': loss, 'kl': mean(kl), 'ratio': mean(ratio), 'clip_fraction': mean(clipped),
         'logprob_mismatch': mean(jnp.abs(roll.logprobs - logp))}
  if next_token:
    final = mask * (roll.tokens < vr)  # [N,T] the real action ending each rollout (the data token)
    data_token = jnp.where(roll.tokens < vr, roll.tokens, 0)  # thinking ids are out of range: masked anyway
    ce = -mean(real_logprobs(logits, data_token, vr), final)
    aux['ce'] = ce
    if cfg.ce_weight:
      loss = loss + cfg.ce_weight * ce
  aux['loss'] = loss
  return loss, (aux, jax.lax.stop_gradient(logp))


def make_think_step(graphdef, teacher_graphdef, tx: optax.GradientTransformation, cfg: ThinkConfig, eos_id: int,
                    mesh):
  """-> jitted `step(state, reference_params, teacher_params, batch: PrefixBatch) -> (state, metrics)`: G rollouts
  per prefix, rewards, advantages, then `mu` optimizer updates. The state is donated."""

  def think_step(state, reference, teacher, batch: PrefixBatch):
    g = cfg.num_generations
    prefix, prefix_mask, target = (jnp.repeat(x, g, axis=0) for x in (batch.prefix, batch.prefix_mask, batch.target))
    policy = nnx.merge(graphdef, state.params)
    vr = policy.cfg.vocab_rows
    roll = generate(policy, prefix, prefix_mask, state_lib.step_key(state, salt=3), cfg, eos_id, target)
    if cfg.mode == 'teacher':
      rewards = teacher_reward(nnx.merge(teacher_graphdef, teacher), prefix, prefix_mask, roll.tokens, roll.mask)
    else:
      rewards = roll.target_logprob
    advantages, zero_std = grpo.group_advantages(rewards, g)
    ref_logp = jnp.zeros(roll.tokens.shape, jnp.float32)
    if cfg.beta:
      ref_logits = rollout_logits(nnx.merge(graphdef, reference), prefix, prefix_mask, roll.tokens)
      ref_logp = action_logprobs(ref_logits, roll.tokens, roll.allowed > 0, vr, cfg.temperature,
                                 cfg.mode == 'next_token')
    grad_fn = jax.grad(think_loss, has_aux=True)

    def iteration(carry, i):
      params, opt_state, old = carry
      grads, (aux, logp) = grad_fn(params, graphdef, roll, prefix, prefix_mask, advantages, ref_logp, old, i == 0,
                                   cfg)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state, jnp.where(i == 0, logp, old)), dict(aux, grad_norm=optax.global_norm(grads))

    (params, opt_state, _), per_iter = jax.lax.scan(
        iteration, (state.params, state.opt_state, jnp.zeros(roll.tokens.shape, jnp.float32)), jnp.arange(cfg.mu))
    metrics = {k: (v[0] if k == 'logprob_mismatch' else jnp.mean(v)) for k, v in per_iter.items()}
    mask = roll.mask.astype(jnp.float32)
    thinking = mask * (roll.tokens >= vr)
    metrics.update(reward=jnp.mean(rewards),
                   reward_std=jnp.mean(jnp.std(rewards.reshape(-1, g), axis=1, ddof=1)),
                   zero_std_fraction=jnp.mean(zero_std.astype(jnp.float32)),
                   think_fraction=jnp.sum(thinking) / jnp.maximum(jnp.sum(mask), 1.0),
                   rollout_length=jnp.sum(mask) / mask.shape[0],
                   think_bias=jnp.mean(params['think_bias']))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(think_step, in_shardings=(replicated, replicated, replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def think_optimizer(t) -> optax.GradientTransformation:
  """From `config.think`: global-norm clipping, then AdamW (warmup + cosine over steps * mu updates); the thinking
  rows at lr * rows_lr_mult; with train='rows' every other parameter gets a zero update and no moments."""
  steps, warmup = t.steps * t.mu, t.warmup_steps * t.mu

  def adamw(peak):
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(steps, warmup + 1),
                                                  end_value=peak * 0.1)
    return optax.adamw(schedule, weight_decay=t.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))

  def labels(params):
    other = 'trunk' if t.train == 'all' else 'frozen'
    return {k: jax.tree.map(lambda _, k=k: 'rows' if k in ROWS else other, v) for k, v in params.items()}

  frozen = lambda params: jax.tree.map(lambda label: label == 'frozen', labels(params))
  transforms = {'rows': adamw(t.lr * t.rows_lr_mult), 'trunk': adamw(t.lr), 'frozen': optax.set_to_zero()}
  return optax.chain(optax.masked(optax.set_to_zero(), frozen), optax.clip_by_global_norm(t.grad_clip),
                     optax.multi_transform(transforms, labels))


# ---------------------------------------------------------------------------------------------- teacher (LM) stage


def lm_logprobs(model: GPT2, tokens, mask) -> jax.Array:
  """Teacher-forced next-token log-probs over the real tokens: tokens, mask [B,L] -> [B,L] (index i: log p(x_i |
  x_<i); 0 at i = 0 and at padding)."""
  lp, _ = output_layer.token_logprobs(model, forward(model, tokens, mask)[:, :-1], tokens[:, 1:], fused=False)
  lp = jnp.where(mask[:, 1:] > 0, lp, 0.0)
  return jnp.concatenate([jnp.zeros_like(lp[:, :1]), lp], axis=1)


def make_lm_step(graphdef, tx: optax.GradientTransformation, mesh):
  """-> jitted `step(state, {'tokens', 'mask'} [B,L]) -> (state, {'loss', 'grad_norm'})`: next-token CE."""

  def loss_fn(params, batch):
    lp = lm_logprobs(nnx.merge(graphdef, params), batch['tokens'], batch['mask'])
    return -jnp.sum(lp) / jnp.maximum(jnp.sum(batch['mask'][:, 1:]), 1)

  def lm_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), {'loss': loss, 'grad_norm': optax.global_norm(grads)})

  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(lm_step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                 donate_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _lm_logprobs_jit(graphdef, params, tokens, mask):
  return lm_logprobs(nnx.merge(graphdef, params), tokens, mask)


# ------------------------------------------------------------------------------------------------------ evaluation


@flax.struct.dataclass
class Interleaved:
  """Decoding with thinking: fed [B,C] int32 the context of each row (x_0, then thinking and real tokens), fed_mask
  [B,C] (1 = a token of the row), target_logprob [B,L] log p(x_i | context with thoughts) over the real tokens at
  i = 1..length-1 (0 elsewhere)."""

  fed: jax.Array
  fed_mask: jax.Array
  target_logprob: jax.Array


def interleaved_decode(model: GPT2, tokens, lengths, key, max_think: int, temperature: float, capacity: int,
                       eos_id: int) -> Interleaved:
  """tokens [B,L] (right-padded), lengths [B] -> Interleaved. Before each real token x_i the policy samples from its
  distribution (thinking allowed while fewer than max_think in a row and the row still fits in `capacity` slots):
  a thinking token joins the context; a real token is replaced by x_i (teacher forcing), scored over the real
  tokens. With max_think = 0 this is teacher-forced decoding (equal to `lm_logprobs`)."""
  b, l = tokens.shape
  c_len, vr = capacity, model.cfg.vocab_rows
  if c_len < l:
    raise ValueError(f'capacity {c_len} < sequence length {l}.')
  cache = kv_cache_for(model.cfg, b, c_len)
  no_keys = jnp.zeros((b, c_len), jnp.float32)
  h, cache = model(model.embed(tokens[:, :1]), jnp.zeros((b, 1), jnp.int32), _step_bias(no_keys, 0, c_len), cache, 0)
  sampling = SamplingConfig(temperature=temperature)
  lengths = lengths.astype(jnp.int32)
  carry = dict(cache=cache, hidden=h[:, 0], i=jnp.ones((b,), jnp.int32), run=jnp.zeros((b,), jnp.int32),
               done=lengths <= 1, fed=jnp.full((b, c_len), eos_id, jnp.int32).at[:, 0].set(tokens[:, 0]),
               fed_mask=jnp.zeros((b, c_len), jnp.int32).at[:, 0].set(1), lp=jnp.zeros((b, l), jnp.float32))

  def body(state):
    s, c = state
    logits = model.logits(c['hidden'])  # [B,V+K]
    allowed = (c['run'] < max_think) & (s + (lengths - c['i']) + 2 <= c_len)
    token, _ = sample(mask_thinking(logits, allowed, vr), jax.random.fold_in(key, s), sampling)
    live = ~c['done']
    think = live & (token >= vr)
    consume = live & ~think
    index = jnp.minimum(c['i'], l - 1)
    target = jnp.take_along_axis(tokens, index[:, None], 1)[:, 0]
    at_i = consume[:, None] & (jnp.arange(l)[None] == index[:, None])
    lp = jnp.where(at_i, real_logprobs(logits, target, vr)[:, None], c['lp'])
    fed_token = jnp.where(think, token, jnp.where(consume, target, eos_id))
    i = c['i'] + consume
    hidden, cache = model(model.embed(fed_token)[:, None], jnp.full((b, 1), s + 1, jnp.int32),
                          _step_bias(no_keys, s + 1, c_len), c['cache'], s + 1)
    put = lambda buf, value: jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), s + 1, axis=1)
    return s + 1, dict(cache=cache, hidden=hidden[:, 0], i=i, run=jnp.where(think, c['run'] + 1, 0),
                       done=c['done'] | (i >= lengths), fed=put(c['fed'], fed_token),
                       fed_mask=put(c['fed_mask'], live), lp=lp)

  _, c = jax.lax.while_loop(lambda st: (st[0] < c_len - 1) & ~jnp.all(st[1]['done']), body, (jnp.int32(0), carry))
  return Interleaved(c['fed'], c['fed_mask'], c['lp'])


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _interleaved_jit(graphdef, params, tokens, lengths, max_think, temperature, capacity, eos_id, key):
  return interleaved_decode(nnx.merge(graphdef, params), tokens, lengths, key, max_think, temperature, capacity,
                            eos_id)


def think_stats(tokens: np.ndarray, mask: np.ndarray, vocab_rows: int, num_think: int) -> tuple[float, np.ndarray]:
  """tokens, mask [...] -> (thinking tokens / all tokens under mask, counts [K] of each thinking id)."""
  tokens, mask = np.asarray(tokens), np.asarray(mask) > 0
  think = tokens[mask & (tokens >= vocab_rows)] - vocab_rows
  counts = np.bincount(think, minlength=num_think)[:num_think].astype(np.int64)
  return float(think.size / max(int(mask.sum()), 1)), counts


def eval_capacity(max_len: int, max_think: int, n_positions: int) -> int:
  """Context slots of the interleaved decoding: every real token after a full run of thoughts, at most
  n_positions."""
  return min(n_positions, max_len * (max_think + 1))


@dataclasses.dataclass
class EvalResult:
  metrics: dict[str, float]
  counts: np.ndarray  # [K] uses of each thinking id
  rows: list[dict]  # decoded samples


def evaluate(teacher_graphdef, teacher_params, graphdef, params, policy_cfg: GPT2Config, texts: Texts, max_think: int,
             temperature: float, key, tokenizer, batch_size: int = 64, num_samples: int = NUM_SAMPLES) -> EvalResult:
  """Next-token losses on `texts` without thinking (teacher; policy with thinking masked) and with thinking
  (`interleaved_decode`), each over every real token after the first and over the answer tokens; thinking
  frequency (thinking / all decoded tokens), thinking tokens per real token, count of each thinking id."""
  vr, k = policy_cfg.vocab_rows, policy_cfg.extra_tokens
  capacity = eval_capacity(texts.max_len, max_think, policy_cfg.n_positions)
  eos = tokenizer.vocab.eos
  lps = {'teacher': [], 'no_think': [], 'think': []}
  feds, fed_masks = [], []
  for start in range(0, len(texts), batch_size):
    chunk = texts.take(np.arange(start, min(start + batch_size, len(texts))))
    tok, mask = jnp.asarray(chunk.tokens), jnp.asarray(chunk.mask())
    lps['teacher'].append(np.asarray(_lm_logprobs_jit(teacher_graphdef, teacher_params, tok, mask)))
    lps['no_think'].append(np.asarray(_lm_logprobs_jit(graphdef, params, tok, mask)))
    out = _interleaved_jit(graphdef, params, tok, jnp.asarray(chunk.lengths), max_think, float(temperature),
                           capacity, eos, jax.random.fold_in(key, start))
    lps['think'].append(np.asarray(out.target_logprob))
    feds.append(np.asarray(out.fed))
    fed_masks.append(np.asarray(out.fed_mask))
  position = np.arange(texts.max_len)[None]
  scored = (position >= 1) & (position < texts.lengths[:, None])  # [N,L]
  answer = (position >= texts.answer_start[:, None]) & (position < texts.lengths[:, None] - 1)
  metrics = {}
  for name, chunks in lps.items():
    lp = np.concatenate(chunks)
    metrics[f'loss_{name}'] = float(-lp[scored].mean())
    metrics[f'answer_loss_{name}'] = float(-lp[answer].mean()) if answer.any() else 0.0
  fed, fed_mask = np.concatenate(feds), np.concatenate(fed_masks)
  fed_mask[:, 0] = 0  # x_0 is given, not decoded
  frequency, counts = think_stats(fed, fed_mask, vr, k)
  metrics.update(think_frequency=frequency, think_per_token=float(counts.sum() / max(int(scored.sum()), 1)),
                 think_ids_used=float((counts > 0).sum()), num_sequences=float(len(texts)),
                 num_scored_tokens=float(scored.sum()))
  rows = [{'text': decode_with_thinking(fed[i][(fed_mask[i] > 0) | (np.arange(fed.shape[1]) == 0)], tokenizer, vr),
           'think_tokens': int(((fed[i] >= vr) & (fed_mask[i] > 0)).sum()), 'real_tokens': int(texts.lengths[i])}
          for i in range(min(num_samples, len(texts)))]
  return EvalResult(metrics, counts, rows)


def decode_with_thinking(ids, tokenizer, vocab_rows: int) -> str:
  """Model ids -> text with `<think_j>` for thinking ids."""
  out, run = [], []
  for i in np.asarray(ids).tolist():
    if i >= vocab_rows:
      if run:
        out.append(tokenizer.decode(run))
        run = []
      out.append(f'<think_{i - vocab_rows}>')
    else:
      run.append(i)
  if run:
    out.append(tokenizer.decode(run))
  return ''.join(out)


def write_report(result: EvalResult, out_dir: str, extra: dict | None = None) -> dict[str, str]:
  """metrics.json (with think_counts), think_histogram.png, samples.jsonl in out_dir -> {name: path}."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name) for name in ('metrics.json', 'think_histogram.png', 'samples.jsonl')}
  with open(paths['metrics.json'], 'w') as f:
    json.dump({**result.metrics, **(extra or {}), 'think_counts': result.counts.tolist()}, f, indent=2)
  with open(paths['samples.jsonl'], 'w') as f:
    for row in result.rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.bar(np.arange(len(result.counts)), result.counts, color='tab:cyan')
  ax.set(xlabel='thinking token id j (<think_j>)', ylabel='uses', xticks=np.arange(len(result.counts)),
         title=f'Thinking tokens used (frequency {result.metrics["think_frequency"]:.3f})')
  fig.tight_layout()
  fig.savefig(paths['think_histogram.png'], dpi=100)
  plt.close(fig)
  return paths


# ---------------------------------------------------------------------------------------------------------- stages


def _run_loop(exp, name: str, state, step_fn, data, validate, steps: int) -> loop.LoopResult:
  """The shared training loop (resume, checkpoints in `<workdir>/<name>/checkpoints`, metrics, SIGTERM)."""
  c, t = exp.config, exp.config.think
  ckpt = Checkpointer(os.path.join(exp.workdir, name, 'checkpoints'), keep=t.keep_checkpoints)
  writer = MetricWriter(exp.workdir, c.get('wandb'), c.to_dict())
  loop_cfg = loop.LoopConfig(name, steps, t.log_every, t.eval_every, t.checkpoint_every)
  workdir_lib.record_stage_config(exp.workdir, name, c)
  try:
    return loop.run(loop_cfg, state, step_fn, data, Temperature(1.0, 1.0, steps), ckpt, writer, validate,
                    meta={'vocab': json.loads(exp.vocab.to_json())})
  finally:
    ckpt.close()
    writer.close()


def _restore_latest(directory: str, params, mesh):
  """The params of the newest checkpoint in `directory`, shaped like `params`."""
  ckpt = Checkpointer(directory, async_save=False)
  steps = ckpt.steps()
  if not steps:
    ckpt.close()
    raise FileNotFoundError(f'No checkpoint in {directory}: run that stage first (config.stage=pipeline).')
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
                          params)
  restored = ckpt.restore_params(steps[-1], abstract)
  ckpt.close()
  log.info('Loaded %s/%d.', directory, steps[-1])
  return restored


def run_teacher(exp, train: Texts, valid: Texts, train_steps: bool = True):
  """The teacher stage -> (graphdef, params, GPT2Config): trained (or resumed) in `<workdir>/teacher/`, or read
  from `config.init_from`'s teacher/ (then nothing trains); `train_steps=False` only restores this workdir's."""
  c, t = exp.config, exp.config.think
  model = build_teacher(c, exp.vocab)
  graphdef, params = state_lib.split_model(model)
  if c.get('init_from'):
    return graphdef, _restore_latest(os.path.join(c.init_from, 'teacher', 'checkpoints'), params, exp.mesh), model.cfg
  if t.teacher_steps == 0:
    return graphdef, parallel.replicate(params, exp.mesh), model.cfg
  if not train_steps:
    return graphdef, _restore_latest(os.path.join(exp.workdir, 'teacher', 'checkpoints'), params, exp.mesh), model.cfg
  parallel.check_divisible(t.batch_size, exp.mesh, 'think.batch_size')
  tx = state_lib.make_optimizer(t.teacher_lr, t.teacher_steps, t.warmup_steps, t.weight_decay, t.grad_clip)
  state = parallel.replicate(state_lib.init_state(params, tx, seed=c.seed), exp.mesh)
  lm_step = make_lm_step(graphdef, tx, exp.mesh)
  batches = lm_iterator(train, t.batch_size, seed=c.seed, process_index=jax.process_index(),
                        process_count=jax.process_count())
  tok, mask = jnp.asarray(valid.tokens), jnp.asarray(valid.mask())
  scored = max(int(mask[:, 1:].sum()), 1)

  def validate(state, step, tau):
    del step, tau
    return {'loss': -float(jnp.sum(_lm_logprobs_jit(graphdef, state.params, tok, mask))) / scored}

  result = _run_loop(exp, 'teacher', state, lambda s, b, tau: lm_step(s, parallel.shard_batch(b, exp.mesh)),
                     batches, validate, t.teacher_steps)
  log.info('teacher finished at step %d: %s', result.step, result.last_validation)
  return graphdef, result.state.params, model.cfg


def initial_policy(exp, teacher_graphdef, teacher_params, teacher_cfg: GPT2Config, train: Texts):
  """-> (graphdef, params): the teacher + fresh thinking rows, think_bias calibrated to `think.init_prob` on the
  first training batch (deterministic: the same on resume)."""
  t = exp.config.think
  rows = np.arange(min(len(train), t.batch_size))
  teacher = nnx.merge(teacher_graphdef, teacher_params)
  tok, mask = jnp.asarray(train.tokens[rows]), jnp.asarray(train.mask()[rows])
  real_logits = teacher.logits(forward(teacher, tok, mask))[..., :teacher_cfg.vocab_rows]
  bias = calibrated_bias(real_logits, mask, t.num_tokens, t.init_prob)
  log.info('think_bias %.3f: thinking probability %.3f at the median training position.', bias, t.init_prob)
  return build_policy(teacher_cfg, teacher_params, t.num_tokens, exp.config.seed + 1, bias)


def run_think(exp, cfg: ThinkConfig, teacher, policy, train: Texts, eval_fn) -> loop.LoopResult:
  """The GRPO stage in `<workdir>/think/`; teacher, policy: (graphdef, params) of the frozen teacher and of the
  initial policy (also the KL reference); eval_fn(params) -> EvalResult, the periodic validation."""
  c, t = exp.config, exp.config.think
  parallel.check_divisible(t.prompts_per_step, exp.mesh, 'think.prompts_per_step')
  graphdef, start = policy
  start = jax.device_get(start)  # host copies: the donated state must not share buffers with the reference
  reference = parallel.replicate(start, exp.mesh)
  tx = think_optimizer(t)
  state = parallel.replicate(state_lib.init_state(start, tx, seed=c.seed + 1), exp.mesh)
  step = make_think_step(graphdef, teacher[0], tx, cfg, exp.vocab.eos, exp.mesh)
  prefixes = prefix_iterator(train, t.prompts_per_step, t.cut, seed=c.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())

  def step_fn(state, batch, tau):
    del tau
    return step(state, reference, teacher[1], parallel.shard_batch(batch, exp.mesh))

  result = _run_loop(exp, 'think', state, step_fn, prefixes, lambda s, step, tau: eval_fn(s.params).metrics,
                     t.steps)
  log.info('think finished at step %d: %s', result.step, result.last_validation)
  return result


def run(exp) -> dict[str, float] | None:
  """The thinking-token method on a `pipeline.Experiment`: teacher, thinking stage, evaluation (`config.stage`:
  'bootstrap' = teacher only, 'grpo' = teacher + thinking, 'eval' = evaluation of the finished stages, 'pipeline' =
  all). Returns the evaluation metrics when it ran."""
  c, t = exp.config, exp.config.think
  cfg = check_config(c)
  train = encode_texts(exp.train, exp.tokenizer, t.max_len, t.with_steps)
  valid = encode_texts(exp.valid[:t.eval_size], exp.tokenizer, train.max_len, t.with_steps)
  need = train.max_len + cfg.rollout_len
  if need > c.model.n_positions:
    raise ValueError(f'Sequences of {train.max_len} tokens (config.think.max_len={t.max_len}) plus rollouts of '
                     f'{cfg.rollout_len} actions (config.think.real_tokens / max_think) need {need} positions, more '
                     f'than config.model.n_positions={c.model.n_positions}: raise it or shorten the others.')
  log.info('think_tokens (%s mode, K=%d): %d train / %d valid texts of <= %d tokens.', cfg.mode, cfg.num_tokens,
           len(train), len(valid), train.max_len)
  stage = c.stage
  teacher_graphdef, teacher_params, teacher_cfg = run_teacher(exp, train, valid, train_steps=stage != 'eval')
  if stage == 'bootstrap':
    return None
  graphdef, start = initial_policy(exp, teacher_graphdef, teacher_params, teacher_cfg, train)
  policy_cfg = dataclasses.replace(teacher_cfg, extra_tokens=cfg.num_tokens)
  eval_key = jax.random.key(c.seed + 2)

  def eval_fn(params):
    return evaluate(teacher_graphdef, teacher_params, graphdef, params, policy_cfg, valid, cfg.max_think,
                    cfg.temperature, eval_key, exp.tokenizer, c.generate.batch_size)

  if stage == 'eval':
    params = _restore_latest(os.path.join(exp.workdir, 'think', 'checkpoints'), start, exp.mesh)
  else:
    result = run_think(exp, cfg, (teacher_graphdef, teacher_params), (graphdef, start), train, eval_fn)
    params = result.state.params
  if stage == 'grpo':
    return None
  name, records = heldout.eval_records(c, exp.valid)  # config.eval; its size, else think.eval_size texts
  texts = encode_texts(records if c.eval.size else records[:t.eval_size], exp.tokenizer, train.max_len,
                       t.with_steps)
  result = evaluate(teacher_graphdef, teacher_params, graphdef, params, policy_cfg, texts, cfg.max_think,
                    cfg.temperature, eval_key, exp.tokenizer, c.generate.batch_size)
  writer = MetricWriter(exp.workdir, c.get('wandb'), c.to_dict())
  writer.write(t.steps, {f'eval/{name}/think/{k}': v for k, v in result.metrics.items()})
  writer.close()
  if jax.process_index() == 0:
    paths = write_report(result, heldout.output_dir(exp.workdir, name, 'think'),
                         {'mode': cfg.mode, 'K': cfg.num_tokens, 'max_think': cfg.max_think, 'split': name,
                          'config': heldout.config_hash(c)})
    log.info('think_tokens evaluation on %s (%d texts): %s. Reports: %s', name, len(texts), result.metrics,
             ', '.join(paths.values()))
  return result.metrics
