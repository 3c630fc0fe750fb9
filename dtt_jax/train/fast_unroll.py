"""`engine.unroll` with a hand-written backward pass: the teacher-forced recurrence without per-step cache residuals.

Same outputs as `engine.unroll` (`Unrolled`: target_hidden [B,T,D], gates [B,T], last_hidden [B,D]) and the same
gradients, computed differently:

* Forward: the prefill and a plain scan of `engine.step` (nothing recorded for autodiff). Saved: the final KV cache,
  the hidden states h_t [B,T,D] (so h_{t-1} of every step), and the inputs.
* Backward: a reverse scan over the steps. The cache is append-only, so the final cache holds every step's keys and
  values: step t, which attends over slots <= P + t (later slots have weight exactly 0 through the NEG_INF bias),
  saw exactly the final cache. Step t is recomputed under `jax.vjp` as a function of (parameters, h_{t-1}, token
  embedding, cache) with the final cache (it rewrites slot P + t with the same keys/values), and is fed the
  cotangents d h_t (from the outputs plus what step t + 1 sent back through its blend), d g_t, and the carried
  cotangent of the cache (holding the gradient of the keys/values of slots < P + t read by later steps, and of slot
  P + t itself, which the write routes to step t's own keys/values). What comes back: d h_{t-1} (carried to step
  t - 1), d embedding_t, d parameters (accumulated), d cache (the new carry). Finally the prompt slots of the carry
  and d h_{-1} go through the VJP of the prefill.

Autodiff of the scan instead stores every step's whole cache as a residual (T copies of [B,H,L,Dh] per layer) and
reads them back in the backward pass: the training step's dominant cost on CPU (benchmarks/README.md).

The token embeddings are looked up once outside (the [V,D] table gets one dense gradient); only the parameters the
step uses go through the custom VJP: everything but `wte` for the DTT gate, everything for the HRPO gate (whose
blend reads the logits of h_{t-1} and the soft embedding, i.e. the whole [V,D] table, every step: its gradient is a
[V,D] carry of the reverse scan). Only the parameters the caller differentiates (JAX's `symbolic_zeros`: e.g. a LoRA
run's adapters, gate and embedding, not its frozen base) get gradient buffers and weight-gradient products, and the
frozen block kernels are kept once in the compute dtype for the whole unroll (`_frozen_copy`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from dtt_jax.model.blocks import is_block_param
from dtt_jax.model.dtt import DTTModel
from dtt_jax.model.gpt2 import Dropout, KVCache, causal_bias, kv_cache_for, positions_from_mask
from dtt_jax.sampling import engine


def _prefill(model: DTTModel, prompt_embedding, prompt_mask, key_bias, dropout=None):
  """`engine.prefill` from looked-up embeddings [B,P,D] -> (cache of P slots, last hidden [B,D])."""
  b, p = prompt_mask.shape
  cache = kv_cache_for(model.gpt2.cfg, b, p)
  bias = causal_bias(prompt_mask) + key_bias[:, None, :p]
  h, cache = model.gpt2(prompt_embedding, positions_from_mask(prompt_mask), bias, cache, 0, dropout)
  return cache, h[:, -1]


def _dropout(static, dropout_key) -> Dropout | None:
  """The Dropout of the static (rate, sequence length) and the key (None at rate 0)."""
  rate, key_len = static[3:5]
  return Dropout(dropout_key, rate, key_len) if rate else None


def _truncate(cache: KVCache, length: int) -> KVCache:
  if length == cache.length:
    return cache
  cut = lambda a: a[:, :, :length]
  return KVCache(tuple(map(cut, cache.k)), tuple(map(cut, cache.v)))


def _step(static, rest, wte, cache, key_bias, prev, embedding, noise, forced, index, position, tau, dropout_key):
  """One completion step as a pure function of the parameters -> (h [B,D], gate [B], cache)."""
  graphdef, hard, *_ = static
  model = nnx.merge(graphdef, wte, rest)
  _, h, g, cache = engine.step(model, cache, key_bias, prev, None, noise, index, position, tau, hard=hard,
                               with_logits=False, token_embedding=embedding, forced_gate=forced,
                               dropout=_dropout(static, dropout_key))
  return h, g, cache


def _forward(static, rest, wte, prompt_embedding, embeddings, noise, forced, tau, prompt_mask, key_bias,
             dropout_key):
  graphdef, _, segment, *_ = static
  model = nnx.merge(graphdef, wte, rest)
  p = prompt_mask.shape[1]
  t_len = embeddings.shape[1]
  num_real = jnp.sum(prompt_mask > 0, axis=-1).astype(jnp.int32)
  cache, h0 = _prefill(model, prompt_embedding, prompt_mask, key_bias, _dropout(static, dropout_key))
  hidden = h0
  hs, gs = [], []

  def body(carry, xs):
    cache, prev = carry
    embedding, noise_t, forced_t, t = xs
    h, g, cache = _step(static, rest, wte, cache, key_bias, prev, embedding, noise_t, forced_t, p + t,
                        num_real + t, tau, dropout_key)
    return (cache, h), (h, g)

  for start, end, cache_len in engine.step_segments(t_len, p, segment, p + t_len):
    xs = (embeddings[:, start:end].swapaxes(0, 1), noise[:, start:end].T,
          None if forced is None else forced[:, start:end].T, jnp.arange(start, end))
    (cache, hidden), (h_seg, g_seg) = jax.lax.scan(body, (cache.grow(cache_len), hidden), xs)
    hs.append(h_seg)
    gs.append(g_seg)
  h_all = jnp.concatenate(hs, 0).swapaxes(0, 1)  # [B,T,D]
  return (h_all, jnp.concatenate(gs, 0).T, h0), cache


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(static, rest, wte, prompt_embedding, embeddings, noise, forced, tau, prompt_mask, key_bias, dropout_key):
  """-> (h [B,T,D] (h_t of every completion step), gates [B,T], h_{-1} [B,D] (last prompt position))."""
  return _forward(static, rest, wte, prompt_embedding, embeddings, noise, forced, tau, prompt_mask, key_bias,
                  dropout_key)[0]


def _core_fwd(static, rest, *args):
  """Arguments wrapped as `CustomVJPPrimal` (symbolic zeros): the leaves of `rest` the caller differentiates
  (perturbed) become `train`, the others `frozen`; the backward pass differentiates `train` only."""
  train = jax.tree.map(lambda p: p.value if p.perturbed else None, rest)
  frozen = jax.tree_util.tree_map_with_path(lambda path, p: None if p.perturbed else _frozen_copy(path, p.value,
                                                                                                  static[5]), rest)
  args = [jax.tree.map(lambda p: p.value, a) for a in args]
  out, cache = _forward(static, _combine(train, frozen), *args)
  h_all, _, h0 = out
  return out, (train, frozen, *args, cache, h_all, h0)


def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _combine(train, frozen):
  """The parameters from their differentiated part and the rest (None in place of the other's leaves)."""
  return jax.tree.map(lambda a, b: b if a is None else a, train, frozen, is_leaf=lambda x: x is None)


def _frozen_copy(path, x, dtype):
  """A frozen parameter as the unroll keeps it: a block's matmul weight (a Linear's or LoRA's kernel, which every use
  casts to the compute dtype) in the compute dtype, the rest as it is. Same values: one compute-dtype copy of the
  frozen trunk serves every position, forward and backward, instead of the float32 one and copies of it per loop."""
  return x.astype(dtype) if is_block_param(path) and any(getattr(k, 'key', None) == 'kernel' for k in path) else x


def _dense(cotangent):
  """A cotangent, or zeros for a symbolic zero (an output nobody differentiates)."""
  return jnp.zeros(cotangent.shape, cotangent.dtype) if isinstance(cotangent, SymbolicZero) else cotangent


def _core_bwd(static, res, cotangents):
  train, frozen, wte, prompt_embedding, embeddings, noise, forced, tau, prompt_mask, key_bias, dropout_key, cache, \
      h_all, h0 = res
  d_h_all, d_gates, d_h0 = map(_dense, cotangents)
  _, _, segment, *_ = static
  p = prompt_mask.shape[1]
  t_len = embeddings.shape[1]
  num_real = jnp.sum(prompt_mask > 0, axis=-1).astype(jnp.int32)
  h_prev = jnp.concatenate([h0[:, None], h_all[:, :-1]], axis=1)  # [B,T,D] h_{t-1}
  d_rest = _zeros_like(train)
  d_next = jnp.zeros_like(h0)  # d h_t sent back by step t + 1 (through its blend and gate)
  d_kv = _zeros_like(cache)
  d_embeddings = []

  for start, end, cache_len in reversed(engine.step_segments(t_len, p, segment, p + t_len)):
    seg_cache = _truncate(cache, cache_len)
    d_kv = _truncate(d_kv, cache_len)  # slots >= P + end were consumed by later segments: zero

    def body(carry, xs, seg_cache=seg_cache):
      d_rest, d_next, d_kv = carry
      prev, embedding, noise_t, forced_t, t, d_h, d_g = xs
      f = lambda r, h, e, c: _step(static, _combine(r, frozen), wte, c, key_bias, h, e, noise_t, forced_t, p + t,
                                   num_real + t, tau, dropout_key)
      _, vjp = jax.vjp(f, train, prev, embedding, seg_cache)
      d_r, d_prev, d_e, d_kv = vjp((d_h + d_next, d_g, d_kv))
      return (jax.tree.map(jnp.add, d_rest, d_r), d_prev, d_kv), d_e

    t_major = lambda x: x[:, start:end].swapaxes(0, 1)
    xs = (t_major(h_prev), t_major(embeddings), noise[:, start:end].T,
          None if forced is None else forced[:, start:end].T, jnp.arange(start, end), t_major(d_h_all),
          d_gates[:, start:end].T)
    (d_rest, d_next, d_kv), d_e = jax.lax.scan(body, (d_rest, d_next, d_kv), xs, reverse=True)
    d_embeddings.insert(0, d_e.swapaxes(0, 1))

  graphdef = static[0]

  def prefill(r, e):
    return _prefill(nnx.merge(graphdef, wte, _combine(r, frozen)), e, prompt_mask, key_bias,
                    _dropout(static, dropout_key))

  _, vjp = jax.vjp(prefill, train, prompt_embedding)
  d_r, d_prompt_embedding = vjp((_truncate(d_kv, p), d_h0 + d_next))
  d_rest = jax.tree.map(jnp.add, d_rest, d_r)
  return (d_rest, None, d_prompt_embedding, jnp.concatenate(d_embeddings, 1), None, None, None, None, None, None)


_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


def _without_remat(graphdef, *states):
  """The graphdef of the same model with `remat='none'` (its blocks' activations are kept: one position's, or the
  prompt's once)."""
  model = nnx.merge(graphdef, *states)
  model.gpt2.cfg = dataclasses.replace(model.gpt2.cfg, remat='none')
  return nnx.split(model, nnx.Nothing if model.hrpo is not None else nnx.PathContains('wte'), ...)[0]


def unroll(model: DTTModel, prompt, prompt_mask, completion, gate_noise, tau, *, hard: bool = False,
           completion_key_bias=None, forced_gates=None, segment: int = 64, dropout: Dropout | None = None
           ) -> engine.Unrolled:
  """`engine.unroll` (same arguments and outputs) with the backward pass of the module docstring; `dropout`'s
  masks depend on its key and the sequence column only, so the backward pass recomputes the forward's. The model's
  `remat` does not apply (the backward pass recomputes each position anyway)."""
  p = prompt.shape[1]
  key_bias = engine.prompt_key_bias(prompt_mask, p + completion.shape[1], completion_key_bias)
  both = model.gpt2.embed(jnp.concatenate([prompt, completion], axis=1))  # [B,P+T,D]: one lookup, one [V,D] scatter
  prompt_embedding, embeddings = both[:, :p], both[:, p:]
  # the step's parameters: all but the token embedding, which the HRPO gate reads too
  graphdef, wte, rest = nnx.split(model, nnx.Nothing if model.hrpo is not None else nnx.PathContains('wte'), ...)
  if model.gpt2.cfg.remat != 'none':  # the backward recomputes every position already (no block remat: prefill too)
    graphdef = _without_remat(graphdef, wte, rest)
  forced = None if forced_gates is None else forced_gates.astype(jnp.float32)
  static = (graphdef, hard, segment, dropout.rate if dropout else 0.0, dropout.key_len if dropout else 0,
            model.gpt2.cfg.dtype)
  h_all, gates, h0 = _core(static, rest, wte, prompt_embedding, embeddings, gate_noise.astype(jnp.float32), forced,
                           jnp.asarray(tau, jnp.float32), prompt_mask, key_bias, dropout.key if dropout else None)
  target_hidden = jnp.concatenate([h0[:, None], h_all[:, :-1]], axis=1)
  return engine.Unrolled(target_hidden, gates, h_all[:, -1])
