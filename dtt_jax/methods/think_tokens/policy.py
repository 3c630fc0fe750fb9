"""The thinking-token policy and its distributions: `config.think` as a hashable `ThinkConfig`, the teacher (a
plain trunk) and the policy (the teacher + K untied thinking rows), and the log-probabilities every other module
scores with.

Columns of the logits [..., V + K]: the first V = vocab_rows are the text tokens, the last K the thinking tokens
`<think_j>` = vocab_rows + j. "Real" means a text column.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtt_jax import parallel
from dtt_jax.model import hf_io, output_layer, precision, trunk_config
from dtt_jax.model.dtt import build_trunk
from dtt_jax.model.gpt2 import GPT2, NEG_INF, GPT2Config, causal_bias, positions_from_mask
from dtt_jax.rl import grpo
from dtt_jax.train import state as state_lib

MODES = ('teacher', 'next_token')
TRAIN = ('all', 'rows')
CUTS = ('text', 'answer')
ROWS = ('think_in', 'think_out', 'think_bias')  # the thinking rows' parameters (top-level keys of the params)


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


# ---------------------------------------------------------------------------------------------------------- models


def build_teacher(c, vocab) -> GPT2:
  """A trunk (either family) without thinking rows from `config.model`: fresh ('scratch') or pretrained weights."""
  m = c.model
  if m.init == 'scratch':
    return build_trunk(trunk_config(m, vocab), nnx.Rngs(c.seed))
  dtype, param_dtype = precision(m)
  return hf_io.load_model(m.init, vocab=vocab, dtype=dtype, param_dtype=param_dtype, seed=c.seed)


def policy_model(teacher_cfg: GPT2Config, num_tokens: int, seed: int) -> GPT2:
  """A fresh trunk shaped like the teacher with `num_tokens` thinking rows (normal(0.02), think_bias 0)."""
  return build_trunk(dataclasses.replace(teacher_cfg, extra_tokens=num_tokens), nnx.Rngs(seed))


def build_policy(teacher_cfg: GPT2Config, teacher_params, num_tokens: int, seed: int, think_bias: float = 0.0):
  """-> (graphdef, params) of the teacher with `num_tokens` fresh thinking rows; think_bias set to `think_bias`.
  Every other parameter is the teacher's (host copies: `teacher_params` may live on the mesh of several processes)."""
  graphdef, params = state_lib.split_model(policy_model(teacher_cfg, num_tokens, seed))
  rows = {k: params[k] for k in ROWS}
  rows['think_bias'] = jnp.full((num_tokens,), think_bias, jnp.float32)
  return graphdef, {**parallel.to_host(teacher_params), **rows}


def calibrated_bias(real_logits, mask, num_tokens: int, init_prob: float) -> float:
  """real_logits [B,T,V] of the teacher on training text, mask [B,T] -> the thinking bias b with which K thinking
  logits equal to b get total probability `init_prob` at the median position: K e^b / (K e^b + e^lse) = init_prob."""
  lse = np.asarray(jax.nn.logsumexp(real_logits.astype(jnp.float32), axis=-1))[np.asarray(mask) > 0]
  return float(np.median(lse) + np.log(init_prob / (1.0 - init_prob)) - np.log(num_tokens))


# ------------------------------------------------------------------------------------------------- distributions


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


def lm_logprobs(model: GPT2, tokens, mask) -> jax.Array:
  """Teacher-forced next-token log-probs over the real tokens: tokens, mask [B,L] -> [B,L] (index i: log p(x_i |
  x_<i); 0 at i = 0 and at padding)."""
  lp, _ = output_layer.token_logprobs(model, forward(model, tokens, mask)[:, :-1], tokens[:, 1:], fused=False)
  lp = jnp.where(mask[:, 1:] > 0, lp, 0.0)
  return jnp.concatenate([jnp.zeros_like(lp[:, :1]), lp], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def lm_logprobs_jit(graphdef, params, tokens, mask):
  """`lm_logprobs` of the model (graphdef, params), jitted."""
  return lm_logprobs(nnx.merge(graphdef, params), tokens, mask)
