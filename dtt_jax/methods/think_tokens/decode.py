"""How the policy decodes with thinking tokens, on the engine's KV-cache machinery (`sampling/engine.py`:
`prefill_trunk`, `trunk_step`, `prompt_key_bias`) over a plain trunk. Only the sampling rules live here:

* `generate` (rollouts): from a left-padded prefix, sample thinking and real tokens; thinking is masked once
  `max_think` thinking tokens came in a row; the rollout ends after `stop_after` real tokens or an eos (next_token
  mode: the ending real token is replaced by the data's).
* `interleaved_decode` (evaluation): along a given text, before each real token the policy may sample thinking
  tokens (same rule, and only while the row still fits its cache), which stay in the context; a sampled real token
  is replaced by the text's next token (teacher forcing) and that token is scored.

Index conventions. `generate`: prefix in cache slots [0, P), action t at slot P + t and position id n_real + t.
`interleaved_decode`: no padding; the fed token s (x_0 first) at slot s and position id s.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from dtt_jax.methods.think_tokens.policy import ThinkConfig, action_logprobs, mask_thinking, real_logprobs
from dtt_jax.model.gpt2 import GPT2, kv_cache_for
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig, sample


@flax.struct.dataclass
class Rollout:
  """Actions sampled after a prefix, per action position t (all [B,N]); target_logprob [B]."""

  tokens: jax.Array  # int32: thinking ids (>= vocab_rows) or real ids; eos after the rollout ended
  mask: jax.Array  # int32 1 = an action of the rollout
  logprobs: jax.Array  # action log-probs under the sampling policy (0 outside mask)
  allowed: jax.Array  # int32 1 = thinking was allowed at t (the consecutive budget not used up)
  target_logprob: jax.Array  # next_token mode: log p(target) over the real tokens where the rollout ended


def generate(model: GPT2, prefix, prefix_mask, key, cfg: ThinkConfig, eos_id: int, targets=None,
             sampling: SamplingConfig | None = None) -> Rollout:
  """prefix, prefix_mask [B,P] (left-padded), targets [B] (next_token mode) -> Rollout of N = cfg.rollout_len
  positions. Thinking tokens (at most max_think in a row) and real tokens are sampled at cfg.temperature (or by
  `sampling`, e.g. greedy); the rollout ends after cfg.stop_after real tokens or an eos. In next_token mode the
  ending real token is recorded as `targets` (the data's token) and target_logprob = log p(target) over the real
  tokens there."""
  b, p = prefix.shape
  n, vr = cfg.rollout_len, model.cfg.vocab_rows
  next_token = cfg.mode == 'next_token'
  targets = jnp.zeros((b,), jnp.int32) if targets is None else targets.astype(jnp.int32)
  pre = engine.prefill_trunk(model, prefix, prefix_mask, p + n)  # cache of P + N slots
  sampling = sampling or SamplingConfig(temperature=cfg.temperature)
  zeros_i = jnp.zeros((b, n), jnp.int32)
  carry = dict(cache=pre.cache, hidden=pre.last_hidden, run=jnp.zeros((b,), jnp.int32),
               n_real=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
               tokens=jnp.full((b, n), eos_id, jnp.int32), mask=zeros_i, logprobs=jnp.zeros((b, n), jnp.float32),
               allowed=zeros_i, target_lp=jnp.zeros((b,), jnp.float32))

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
    hidden, cache = engine.trunk_step(model, c['cache'], pre.key_bias, model.embed(token), p + t, pre.num_real + t)
    new = dict(c, cache=cache, hidden=hidden, run=jnp.where(is_think & live, c['run'] + 1, 0), n_real=n_real,
               done=done, target_lp=target_lp)
    record = dict(tokens=token, mask=live, logprobs=jnp.where(live, logp, 0.0), allowed=allowed & live)
    for name, value in record.items():
      new[name] = jax.lax.dynamic_update_index_in_dim(c[name], value.astype(c[name].dtype), t, axis=1)
    return t + 1, new

  _, c = jax.lax.while_loop(lambda s: (s[0] < n) & ~jnp.all(s[1]['done']), body, (jnp.int32(0), carry))
  return Rollout(c['tokens'], c['mask'], c['logprobs'], c['allowed'], c['target_lp'])


@flax.struct.dataclass
class Interleaved:
  """Decoding with thinking: fed [B,C] int32 the context of each row (x_0, then thinking and real tokens), fed_mask
  [B,C] (1 = a token of the row), target_logprob [B,L] log p(x_i | context with thoughts) over the real tokens at
  i = 1..length-1 (0 elsewhere)."""

  fed: jax.Array
  fed_mask: jax.Array
  target_logprob: jax.Array


def eval_capacity(max_len: int, max_think: int, n_positions: int) -> int:
  """Context slots of the interleaved decoding: every real token after a full run of thoughts, at most
  n_positions."""
  return min(n_positions, max_len * (max_think + 1))


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
  no_padding = jnp.zeros((b, c_len), jnp.float32)  # key bias: every fed slot is a real key
  h, cache = engine.trunk_step(model, kv_cache_for(model.cfg, b, c_len), no_padding, model.embed(tokens[:, 0]), 0,
                               jnp.zeros((b,), jnp.int32))
  sampling = SamplingConfig(temperature=temperature)
  lengths = lengths.astype(jnp.int32)
  carry = dict(cache=cache, hidden=h, i=jnp.ones((b,), jnp.int32), run=jnp.zeros((b,), jnp.int32),
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
    hidden, cache = engine.trunk_step(model, c['cache'], no_padding, model.embed(fed_token), s + 1,
                                      jnp.full((b,), s + 1, jnp.int32))
    put = lambda buf, value: jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), s + 1, axis=1)
    return s + 1, dict(cache=cache, hidden=hidden, i=i, run=jnp.where(think, c['run'] + 1, 0),
                       done=c['done'] | (i >= lengths), fed=put(c['fed'], fed_token),
                       fed_mask=put(c['fed_mask'], live), lp=lp)

  _, c = jax.lax.while_loop(lambda st: (st[0] < c_len - 1) & ~jnp.all(st[1]['done']), body, (jnp.int32(0), carry))
  return Interleaved(c['fed'], c['fed_mask'], c['lp'])


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def interleaved_jit(graphdef, params, tokens, lengths, max_think, temperature, capacity, eos_id, key_data):
  """`interleaved_decode` of the policy (graphdef, params), jitted; key_data: `jax.random.key_data` of the key (a
  plain array, which the mesh of several processes takes as it takes the tokens)."""
  return interleaved_decode(nnx.merge(graphdef, params), tokens, lengths, jax.random.wrap_key_data(key_data),
                            max_think, temperature, capacity, eos_id)
