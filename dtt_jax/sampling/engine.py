"""The latent generation engine: one step function with a KV cache, and its three uses (SPEC §4).

* `step`: blend the next input from the previous hidden state and the token embedding with the gate, run GPT-2 on
  one position against the preallocated cache, return (logits, hidden, gate, cache).
* `generate`: parallel prefill of left-padded prompts, then the step in a `lax.while_loop` (stops when every row
  has emitted <|endoftext|>) or a fixed-length loop; records everything needed to re-score the rollout.
* `unroll`: teacher-forced: the same step scanned over given completion tokens, differentiable.
* `rescore`: one parallel forward pass that rebuilds the blended inputs from stored hidden states and noise.

The cache machinery under `step` works on a plain trunk too (GPT-2 or Llama family, no gate; the thinking-token
method's decoding uses it): `prompt_key_bias` (the per-key bias of a cache holding a left-padded prompt),
`step_bias`, `trunk_step` (one position against the cache), `prefill_trunk`.

Index conventions. The prompt occupies cache positions [0, P) (left-padded); completion token t sits at cache
position P + t and position id n_real_prompt + t. `hidden_inputs[:, t]` is h_{t-1}, the final hidden state whose
gate/projection blends into the input of completion position t (h_{-1} is the last prompt position's). The logits
that predict completion token t come from h_{t-1} too.

Attention cost is kept proportional to the generated length: the steps are grouped in segments of `segment`
positions, and before each segment the cache grows (one copy) to the length that segment can see, so every step
attends over its whole cache buffer with a static shape (slicing a prefix would make XLA copy it every step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from dtt_jax.model.dtt import DTTModel, blend, logistic_noise, pin_noise
from dtt_jax.model.gpt2 import NEG_INF, KVCache, causal_bias, kv_cache_for, positions_from_mask
from dtt_jax.sampling.sampler import SamplingConfig, sample, token_logprob


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Static settings of `generate` (hashable: one compilation per distinct config and shape)."""

  max_new_tokens: int = 64
  eos_id: int = 50256  # model ids of the specials (take them from tokens.Vocab)
  bot_id: int = 50257
  eot_id: int = 50258
  sampling: SamplingConfig = SamplingConfig()
  max_think: int = 0  # > 0: force <|eot|> once the span holds this many tokens (per row: `think_budget`)
  gate_noise: bool = False  # Gumbel noise on the gate (True in rollouts, False for evaluation)
  hard_gate: bool = False
  early_stop: bool = True  # while_loop that stops when all rows are done; False: fixed-length loop
  segment: int = 64
  return_hidden: bool = True  # keep hidden_inputs [B,N,D] (needed to re-score a rollout)
  forced_prefix: tuple[int, ...] = ()  # tokens forced at the first steps (COCONUT: <|bot|>, latents, <|eot|>)
  latent_id: int = -1  # >= 0: no gate head; the gate is 1 at this token (the input is exactly the previous hidden
  # state, COCONUT's continuous thought) and 0 at every other token (plain GPT-2 decoding)
  pinned_id: int = -1  # >= 0: the gate head decides everywhere but at this token, where the gate is 1 (`pin_noise`)
  pin_others: bool = False  # with pinned_id: the gate is 0 at every other token (`pin_noise`)
  transposed_output: bool | None = None  # logits against a [D,V] copy of the output table (`output_kernel`: a faster
  # dot on XLA CPU, one more copy of the table in memory). None: `generate` on the CPU backend uses one kept between
  # calls for the same table array (made once per distinct weights); `generate_traced` makes none. True: always (in
  # the traced computation when not given). False: never.


@flax.struct.dataclass
class Rollout:
  """What generation produced, per completion position t (all [B,N] unless noted)."""

  tokens: jax.Array  # int32; eos after a row is done
  mask: jax.Array  # 1 for real tokens, through the first eos inclusive
  logprobs: jax.Array  # log p(token) under the temperature-scaled policy, 0 where mask is 0
  gates: jax.Array  # gate value g_t that blended position t's input
  gate_noise: jax.Array  # logistic noise n_t used for g_t (0 when noise is off)
  forced: jax.Array  # 1 where the token was forced, not sampled (the reasoning budget's <|eot|>, `forced_prefix`)
  hidden_inputs: jax.Array | None  # [B,N,D] h_{t-1}
  logits: jax.Array | None = None  # [B,N,V] float32, only from `generate(..., return_logits=True)` (tests)


def noisy_span_bias(filler_mask, scale: float) -> jax.Array:
  """filler_mask [B,T] -> additive attention bias of those keys (a `completion_key_bias`): log(scale) on injected
  filler, 0 elsewhere."""
  return jnp.where(filler_mask > 0, math.log(scale), 0.0)


def prompt_key_bias(prompt_mask, max_len: int, completion_key_bias=None) -> jax.Array:
  """prompt_mask [B,P] (left-padded) -> [B,max_len] additive per-key bias of a cache whose slots [0, P) hold the
  prompt: NEG_INF at prompt padding, 0 at its real tokens and after it; completion_key_bias [B,T] (e.g. log 0.3 on
  injected filler) on slots [P, P + T)."""
  b, p = prompt_mask.shape
  bias = jnp.zeros((b, max_len), jnp.float32)
  bias = bias.at[:, :p].set(jnp.where(prompt_mask > 0, 0.0, NEG_INF))
  if completion_key_bias is not None:
    bias = bias.at[:, p:p + completion_key_bias.shape[1]].set(completion_key_bias)
  return bias


def step_bias(key_bias: jax.Array, index, cache_len: int) -> jax.Array:
  """key_bias [B,S] (S >= cache_len), current cache index -> [B,1,cache_len] additive bias of the query at slot
  `index` (keys after `index` masked)."""
  visible = jnp.arange(cache_len) <= index
  return (key_bias[:, :cache_len] + jnp.where(visible, 0.0, NEG_INF))[:, None, :]


def trunk_step(trunk, cache: KVCache, key_bias, x, index, position, dropout=None) -> tuple[jax.Array, KVCache]:
  """One position of a plain trunk (GPT2 or Llama) against the cache: x [B,D] the input embedding, index its cache
  slot (scalar), position [B] its position ids. Attends over the whole cache (slots after `index` masked).
  `dropout` (`gpt2.Dropout`): training mode, the masks of sequence column `index`.
  Returns hidden [B,D] (after the final norm), cache."""
  h, cache = trunk(x[:, None], position[:, None], step_bias(key_bias, index, cache.length), cache, index, dropout)
  return h[:, 0], cache


def step(model: DTTModel, cache: KVCache, key_bias, prev_hidden, token, gate_noise, index, position, tau, *,
         hard: bool = False, with_logits: bool = True, token_embedding=None, forced_gate=None, output_kernel=None,
         dropout=None):
  """One position. prev_hidden [B,D], token [B], gate_noise [B], position [B]; index: cache slot (scalar).
  token_embedding [B,D]: the token's embedding when the caller looked it up already (else `token` is looked up).
  forced_gate [B]: a fixed gate instead of the model's (COCONUT: 1 = the input is exactly prev_hidden).
  output_kernel [D,V]: `model.gpt2.output_kernel()`, made once by a caller that steps many times.
  dropout: `gpt2.Dropout` (training mode; the teacher-forced unroll of the bootstrap), else none.

  Attends over the whole cache (slots after `index` masked). Returns logits [B,V] float32 (None unless
  with_logits), hidden [B,D] (after ln_f), gate [B], cache.
  """
  if token_embedding is None:
    token_embedding = model.gpt2.embed(token)
  if forced_gate is None:
    x, gate = model.blend_embedding(prev_hidden, token_embedding, gate_noise, tau, hard)
  else:
    x, gate = blend(forced_gate, prev_hidden, token_embedding), forced_gate
  h, cache = trunk_step(model.gpt2, cache, key_bias, x, index, position, dropout)
  return (model.gpt2.logits(h, output_kernel) if with_logits else None), h, gate, cache


@flax.struct.dataclass
class Prefill:
  cache: KVCache
  key_bias: jax.Array  # [B,S] additive per-key bias: NEG_INF at prompt padding, else 0 or noisy-span bias
  last_hidden: jax.Array  # [B,D] final hidden of the last prompt position
  num_real: jax.Array  # [B] real prompt tokens (position id of completion token 0)


def prefill(model: DTTModel, prompt, prompt_mask, max_len: int, completion_key_bias=None,
            cache_len: int | None = None, dropout=None) -> Prefill:
  """`prefill_trunk` on the model's trunk."""
  return prefill_trunk(model.gpt2, prompt, prompt_mask, max_len, completion_key_bias, cache_len, dropout)


def prefill_trunk(trunk, prompt, prompt_mask, max_len: int, completion_key_bias=None,
                  cache_len: int | None = None, dropout=None) -> Prefill:
  """prompt, prompt_mask [B,P] (left-padded) -> cache of `cache_len` slots (default max_len) holding the
  prompt's keys/values in slots [0, P); key_bias (`prompt_key_bias`) covers all max_len slots. trunk: a plain
  GPT2 or Llama.

  completion_key_bias [B,T]: additive bias of completion keys (e.g. log 0.3 on injected filler), default 0.
  dropout: `gpt2.Dropout` (training mode) over sequence columns [0, P), else none.
  """
  b, p = prompt.shape
  bias_k = prompt_key_bias(prompt_mask, max_len, completion_key_bias)
  cache = kv_cache_for(trunk.cfg, b, p)
  bias = causal_bias(prompt_mask) + bias_k[:, None, :p]
  h, cache = trunk(trunk.embed(prompt), positions_from_mask(prompt_mask), bias, cache, 0, dropout)
  return Prefill(cache.grow(cache_len or max_len), bias_k, h[:, -1],
                 jnp.sum(prompt_mask > 0, axis=-1).astype(jnp.int32))


def step_segments(n_steps: int, prompt_len: int, segment: int, max_len: int):
  """[(first step, end step, cache length)]: step t writes cache slot prompt_len + t, so a segment ending at step
  e needs the first prompt_len + e slots."""
  return [(s, min(s + segment, n_steps), min(max_len, prompt_len + min(s + segment, n_steps)))
          for s in range(0, n_steps, segment)]


def _generate(model: DTTModel, prompt, prompt_mask, key, tau, cfg: GenerateConfig, return_logits: bool,
              output_kernel=None, think_budget=None):
  b, p = prompt.shape
  n = cfg.max_new_tokens
  max_len = p + n
  segments = step_segments(n, p, cfg.segment, max_len)
  pre = prefill(model, prompt, prompt_mask, max_len, cache_len=segments[0][2])
  d = pre.last_hidden.shape[-1]
  kernel = output_kernel
  if kernel is None and cfg.transposed_output:
    kernel = model.gpt2.output_kernel()
  first_logits = model.gpt2.logits(pre.last_hidden, kernel)
  carry = dict(
      cache=pre.cache, hidden=pre.last_hidden, logits=first_logits,
      done=jnp.zeros((b,), bool), phase=jnp.zeros((b,), jnp.int32), n_think=jnp.zeros((b,), jnp.int32),
      tokens=jnp.full((b, n), cfg.eos_id, jnp.int32), mask=jnp.zeros((b, n), jnp.int32),
      logprobs=jnp.zeros((b, n), jnp.float32), gates=jnp.zeros((b, n), jnp.float32),
      gate_noise=jnp.zeros((b, n), jnp.float32), forced=jnp.zeros((b, n), jnp.int32),
      hidden_inputs=jnp.zeros((b, n, d), pre.last_hidden.dtype) if cfg.return_hidden else None,
      all_logits=jnp.zeros((b, n) + first_logits.shape[1:], jnp.float32) if return_logits else None,
  )

  def body(t, c):
    key_t = jax.random.fold_in(key, t)
    token, lognorm = sample(c['logits'], jax.random.fold_in(key_t, 0), cfg.sampling)
    if think_budget is not None:  # [B] per-row budgets (GRPO's drawn budgets)
      forced = (c['phase'] == 1) & (c['n_think'] >= think_budget)
    else:
      forced = (c['phase'] == 1) & (c['n_think'] >= cfg.max_think) if cfg.max_think > 0 else jnp.zeros((b,), bool)
    token = jnp.where(forced, cfg.eot_id, token)
    if cfg.forced_prefix:
      prefix = jnp.asarray(cfg.forced_prefix, jnp.int32)
      in_prefix = t < len(cfg.forced_prefix)
      token = jnp.where(in_prefix, prefix[jnp.minimum(t, len(cfg.forced_prefix) - 1)], token)
      forced = forced | in_prefix
    live = ~c['done']
    token = jnp.where(live, token, cfg.eos_id)
    logp = token_logprob(c['logits'], token, lognorm, cfg.sampling)
    noise = (logistic_noise(jax.random.fold_in(key_t, 1), (b,)) if cfg.gate_noise
             else jnp.zeros((b,), jnp.float32))
    noise = pin_noise(noise, token, cfg.pinned_id, cfg.pin_others)
    forced_gate = (token == cfg.latent_id).astype(jnp.float32) if cfg.latent_id >= 0 else None
    logits, hidden, gate, cache = step(model, c['cache'], pre.key_bias, c['hidden'], token, noise, p + t,
                                       pre.num_real + t, tau, hard=cfg.hard_gate, forced_gate=forced_gate,
                                       output_kernel=kernel)
    is_eot = token == cfg.eot_id
    inner = live & (c['phase'] == 1) & ~is_eot
    phase = jnp.where((c['phase'] == 0) & (token == cfg.bot_id), 1,
                      jnp.where((c['phase'] == 1) & is_eot, 2, c['phase']))
    new = dict(c, cache=cache, hidden=hidden, logits=logits, phase=phase, n_think=c['n_think'] + inner,
               done=c['done'] | (token == cfg.eos_id))
    record = dict(tokens=token, mask=live.astype(jnp.int32), logprobs=jnp.where(live, logp, 0.0), gates=gate,
                  gate_noise=noise, forced=(forced & live).astype(jnp.int32))
    if cfg.return_hidden:
      record['hidden_inputs'] = c['hidden']
    if return_logits:
      record['all_logits'] = c['logits']
    for name, value in record.items():
      new[name] = jax.lax.dynamic_update_index_in_dim(c[name], value.astype(c[name].dtype), t, axis=1)
    return new

  for start, end, cache_len in segments:
    carry['cache'] = carry['cache'].grow(cache_len)
    if cfg.early_stop:
      state = (jnp.int32(start), carry)
      state = jax.lax.while_loop(lambda s, e=end: (s[0] < e) & ~jnp.all(s[1]['done']),
                                 lambda s: (s[0] + 1, body(s[0], s[1])), state)
      carry = state[1]
    else:
      carry = jax.lax.fori_loop(start, end, body, carry)
  return Rollout(tokens=carry['tokens'], mask=carry['mask'], logprobs=carry['logprobs'], gates=carry['gates'],
                 gate_noise=carry['gate_noise'], forced=carry['forced'], hidden_inputs=carry['hidden_inputs'],
                 logits=carry['all_logits'])


@functools.partial(jax.jit, static_argnames=('graphdef', 'cfg', 'return_logits'))
def _generate_jit(graphdef, state, prompt, prompt_mask, key, tau, cfg, return_logits, output_kernel, think_budget):
  return _generate(nnx.merge(graphdef, state), prompt, prompt_mask, key, tau, cfg, return_logits, output_kernel,
                   think_budget)


_KERNEL_CACHE = {}  # 'entry': (weakref to the output table, dtype, [D,V] kernel); dropped when that array is freed


def _cached_output_kernel(gpt2) -> jax.Array | None:
  """gpt2.output_kernel() for the current output table (`output_table()`: `wte`, or an untied Llama's `lm_head`),
  made once and kept until the array is freed (one entry). None for a traced table (nothing to keep)."""
  table = gpt2.output_table()
  if isinstance(table, jax.core.Tracer):
    return None
  entry = _KERNEL_CACHE.get('entry')
  if entry is not None and entry[0]() is table and entry[1] == gpt2.cfg.dtype:
    return entry[2]
  kernel = _transpose_kernel(table, gpt2.cfg.dtype)
  try:
    ref = weakref.ref(table, _drop_kernel)
  except TypeError:  # not weak-referenceable: no reuse
    return kernel
  _KERNEL_CACHE['entry'] = (ref, gpt2.cfg.dtype, kernel)
  return kernel


def _drop_kernel(ref):
  if _KERNEL_CACHE.get('entry', (None,))[0] is ref:
    del _KERNEL_CACHE['entry']


@functools.partial(jax.jit, static_argnames=('dtype',))
def _transpose_kernel(table, dtype):
  return table.astype(dtype).T


def generate(model: DTTModel, prompt, prompt_mask, key, tau=1.0, cfg: GenerateConfig = GenerateConfig(),
             return_logits: bool = False, think_budget=None) -> Rollout:
  """prompt, prompt_mask [B,P] (left-padded) -> Rollout of cfg.max_new_tokens positions. Jitted; compiled once
  per (config, shapes). Inside another jitted function, call `generate_traced` instead.

  think_budget [B] int (optional): per row, `<|eot|>` is forced once the span holds that many positions (0: right
  after `<|bot|>`), instead of `cfg.max_think`."""
  kernel = None
  if cfg.transposed_output or (cfg.transposed_output is None and jax.default_backend() == 'cpu'):
    kernel = _cached_output_kernel(model.gpt2)
  graphdef, state = nnx.split(model)
  return _generate_jit(graphdef, state, prompt, prompt_mask, key, jnp.asarray(tau, jnp.float32), cfg,
                       return_logits, kernel, think_budget)


generate_traced = _generate


@flax.struct.dataclass
class Unrolled:
  target_hidden: jax.Array  # [B,T,D] h_{t-1}: the hidden state whose logits predict completion token t
  gates: jax.Array  # [B,T]
  last_hidden: jax.Array  # [B,D] h_{T-1}


def unroll(model: DTTModel, prompt, prompt_mask, completion, gate_noise, tau, *, hard: bool = False,
           completion_key_bias=None, segment: int = 64, forced_gates=None, dropout=None) -> Unrolled:
  """Teacher-forced recurrent pass over completion [B,T] with the exact blend; differentiable end to end.
  forced_gates [B,T]: fixed gates instead of the model's (COCONUT's latent positions: 1, elsewhere 0).
  dropout: `gpt2.Dropout` over the P + T sequence columns (training mode), else none.

  gate_noise [B,T] (zeros for deterministic gates). Logits are not computed inside the recurrence (only hidden
  states feed back), so the caller computes them once, in one large matmul, where it needs them:
  `model.gpt2.logits(out.target_hidden)`.
  """
  b, p = prompt.shape
  t_len = completion.shape[1]
  max_len = p + t_len
  segments = step_segments(t_len, p, segment, max_len)
  pre = prefill(model, prompt, prompt_mask, max_len, completion_key_bias, cache_len=segments[0][2], dropout=dropout)
  cache, hidden = pre.cache, pre.last_hidden
  hiddens, gates = [], []

  embeddings = model.gpt2.embed(completion).swapaxes(0, 1)  # [T,B,D], looked up once (one gradient scatter)

  def body(carry, xs):
    cache, prev = carry
    embedding, noise, forced, t = xs
    _, h, g, cache = step(model, cache, pre.key_bias, prev, None, noise, p + t, pre.num_real + t, tau, hard=hard,
                          with_logits=False, token_embedding=embedding, forced_gate=forced, dropout=dropout)
    return (cache, h), (h, g)

  for start, end, cache_len in segments:
    forced = None if forced_gates is None else forced_gates[:, start:end].T.astype(jnp.float32)
    xs = (embeddings[start:end], gate_noise[:, start:end].T, forced, jnp.arange(start, end))
    (cache, hidden), (h_seg, g_seg) = jax.lax.scan(body, (cache.grow(cache_len), hidden), xs)
    hiddens.append(h_seg)
    gates.append(g_seg)
  h_all = jnp.concatenate(hiddens, 0).swapaxes(0, 1)  # [B,T,D]
  target_hidden = jnp.concatenate([pre.last_hidden[:, None], h_all[:, :-1]], axis=1)
  return Unrolled(target_hidden, jnp.concatenate(gates, 0).T, h_all[:, -1])


def rescore(model: DTTModel, prompt, prompt_mask, completion, hidden_inputs, gate_noise, tau, *,
            hard: bool = False) -> tuple[jax.Array, jax.Array]:
  """One parallel pass over prompt + completion with inputs rebuilt from stored hidden states and noise.

  hidden_inputs [B,T,D] (no gradient flows into them; the gate head and projection do get gradient),
  gate_noise [B,T] -> (target_hidden [B,T,D] as in `Unrolled`, gates [B,T]).
  """
  p = prompt.shape[1]
  t_len = completion.shape[1]
  x_completion, gates = model.blended_input(jax.lax.stop_gradient(hidden_inputs), completion, gate_noise, tau, hard)
  x = jnp.concatenate([model.gpt2.embed(prompt), x_completion], axis=1)
  mask = jnp.concatenate([prompt_mask, jnp.ones_like(completion)], axis=1)
  h, _ = model.gpt2(x, positions_from_mask(mask), causal_bias(mask))
  return h[:, p - 1:p + t_len - 1], gates
