"""GPT-2 in Flax NNX with HF GPT-2 numerics (pre-LN, gelu_new, LayerNorm eps 1e-5, tied wte).

Parameter names mirror HF's (`wte`, `wpe`, `h[i].attn.c_attn`, ..., `ln_f`) so checkpoints map one to one
(`model/hf_io.py`). Linear kernels are `[in, out]` like HF's Conv1D weights.

Attention takes an additive bias `[B, Tq, Tk]` (0 = attend, NEG_INF = masked, log(0.3) = noisy-span key) built
by the caller, and an optional preallocated KV cache (per layer `[B, heads, cache_len, head_dim]`) that the layer
writes its new keys/values into at `cache_index` before attending over all `cache_len` cache positions (Tk).

Learned thinking tokens (`extra_tokens = K > 0`, `config.method='think_tokens'`, `dtt_jax/methods/think_tokens/`):
K extra ids `vocab_rows + j` (j < K) with their own untied rows, `think_in` [K, D] (input embedding), `think_out` [K, D]
and `think_bias` [K] (output layer); the original `wte` rows stay tied. `embed` looks thinking ids up in
`think_in`, `logits` returns [..., vocab_rows + K] whose last K columns are `h @ think_out.T + think_bias`. With
K = 0 (the default) the model has none of these parameters and computes exactly what it did before they existed.

Dropout (`Dropout`, given to `GPT2.__call__`; none by default, as in evaluation): HF GPT-2's training mode, i.e.
the same rate after the embedding sum, on the attention probabilities, and on the attention and MLP outputs before
each residual add. A mask depends only on the key, the site and the sequence column of its query (the cache slot),
never on which call computes that column, so a sequence computed in pieces over a KV cache (COCONUT's n + 1
passes) draws exactly the masks of one parallel pass over it.

Precision (both families; `config.model.dtype`, `config.model.param_dtype`): parameters are stored in `param_dtype`
(float32 master weights by default, so gradients and optimizer state are float32); matmuls, attention products,
the residual stream and the KV cache run in the compute `dtype` ('bfloat16' on accelerators). In float32 whatever
`dtype` is: attention scores and their softmax, LayerNorm / RMSNorm statistics, RoPE angles, the logits (float32
accumulation of compute-dtype operands, `output_logits`) and everything computed from them (`output_layer.py`'s
loss, log-probs and log-sum-exp), and the DTT gate's logit and sigmoid (`dtt.py`).
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from dtt_jax.model.blocks import check_remat, run_blocks

NEG_INF = -1e9  # finite, so a fully masked (padding) query row gives a uniform softmax instead of NaN
DTYPES = ('float32', 'bfloat16')  # config.model.dtype (compute) and config.model.param_dtype (stored parameters)


def check_precision(dtype: str, param_dtype: str) -> None:
  """Raises a ValueError naming `config.model.dtype` / `config.model.param_dtype` unless each is in DTYPES."""
  for key, value in (('dtype', dtype), ('param_dtype', param_dtype)):
    if value not in DTYPES:
      raise ValueError(f'config.model.{key}={value!r}: expected one of {", ".join(map(repr, DTYPES))} ('
                       + ('the compute dtype of matmuls and attention' if key == 'dtype' else
                          'the stored parameter dtype; "bfloat16" for inference only, training keeps float32 master '
                          'weights') + ').')


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_rows: int = 50304  # embedding rows (padded to a multiple of 128)
  num_tokens: int = 50261  # real rows; logits of rows >= num_tokens are masked
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  dtype: str = 'float32'  # compute dtype of matmuls and attention ('bfloat16' on accelerators)
  param_dtype: str = 'float32'  # stored parameters: float32 master weights ('bfloat16': inference only)
  extra_tokens: int = 0  # K thinking tokens: ids vocab_rows + j (j < K), untied rows think_in / think_out
  remat: str = 'none'  # 'none' | 'block' | 'dots': rematerialization of the blocks (`blocks.py`)

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def family(self) -> str:
    """The model family (`LlamaConfig.family` for the others)."""
    return 'gpt2'

  @property
  def total_rows(self) -> int:
    """Logit columns: vocab_rows, then the K thinking tokens."""
    return self.vocab_rows + self.extra_tokens

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f'n_embd={self.n_embd} is not divisible by n_head={self.n_head}.')
    if not 0 < self.num_tokens <= self.vocab_rows:
      raise ValueError(f'num_tokens={self.num_tokens} must be in (0, vocab_rows={self.vocab_rows}].')
    if self.extra_tokens < 0:
      raise ValueError(f'extra_tokens={self.extra_tokens} (config.think.num_tokens) must be >= 0.')
    check_precision(self.dtype, self.param_dtype)
    check_remat(self.remat)


@flax.struct.dataclass
class KVCache:
  """Keys and values, one buffer per layer: k[layer], v[layer] `[B, heads, cache_len, head_dim]`.

  Heads before positions, so a one-query step reads each head's keys as one contiguous [cache_len, head_dim]
  matrix, and one buffer per layer, so attention reads a whole buffer: a slice of a stacked [layers, ...] array or a
  prefix of the positions is copied by XLA before the dot, every layer of every step (3x the cache traffic,
  measured on CPU). A caller that wants attention cost to follow the sequence length grows the cache in segments
  (`grow`) instead of slicing it.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @classmethod
  def zeros(cls, cfg: GPT2Config, batch: int, length: int, heads: int | None = None) -> KVCache:
    """A zero cache of `heads` heads per layer (default cfg.n_head; `kv_cache_for` picks it for either family)."""
    shape = (batch, heads or cfg.n_head, length, cfg.head_dim)
    return cls(*(tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layer)) for _ in range(2)))

  @property
  def length(self) -> int:
    return self.k[0].shape[2]

  def grow(self, length: int) -> KVCache:
    """-> the cache with zero slots appended up to `length` positions (one copy; no-op at the same length)."""
    if length == self.length:
      return self
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, length - self.length), (0, 0)))
    return KVCache(tuple(map(pad, self.k)), tuple(map(pad, self.v)))

  def write(self, layer: int, index, k: jax.Array, v: jax.Array) -> KVCache:
    """Stores k, v [B,H,T,Dh] at positions [index, index + T) of `layer`."""
    put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, index, 0))
    replace = lambda bufs, new: bufs[:layer] + (put(bufs[layer], new),) + bufs[layer + 1:]
    return KVCache(replace(self.k, k), replace(self.v, v))


def kv_cache_for(cfg, batch: int, length: int) -> KVCache:
  """A zero cache for a trunk of either family: [B, heads, length, head_dim] per layer with the trunk's key/value
  heads (a Llama / Qwen2 config's n_kv_head, stored once under grouped-query attention; GPT-2's n_head)."""
  return KVCache.zeros(cfg, batch, length, getattr(cfg, 'n_kv_head', cfg.n_head))


@dataclasses.dataclass(frozen=True)
class Dropout:
  """Training-mode dropout at `rate` from `key` (module docstring). Attention masks are drawn over `key_len` key
  columns (the full sequence length) and cut to the keys a call attends to."""

  key: jax.Array
  rate: float
  key_len: int

  def _keep(self, site: int, columns, shape) -> jax.Array:
    """-> bool [T, *shape]: row t is the mask of sequence column columns[t] at `site`."""
    key = jax.random.fold_in(self.key, site)
    return jax.vmap(lambda c: jax.random.bernoulli(jax.random.fold_in(key, c), 1.0 - self.rate, shape))(columns)

  def _apply(self, x, keep):
    return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)

  def hidden(self, x, site: int, columns) -> jax.Array:
    """x [B,T,D] at sequence columns [T] -> x with dropout."""
    if not self.rate:
      return x
    return self._apply(x, self._keep(site, columns, (x.shape[0], x.shape[2])).swapaxes(0, 1))  # [B,T,D]

  def probs(self, p, site: int, columns) -> jax.Array:
    """Attention probabilities [B,H,T,Tk] (Tk <= key_len) of queries at sequence columns [T] -> with dropout."""
    if not self.rate:
      return p
    b, h, _, tk = p.shape
    keep = self._keep(site, columns, (b, h, self.key_len))[..., :tk]  # [T,B,H,Tk]
    return self._apply(p, keep.transpose(1, 2, 0, 3))


def _site(layer: int, which: int) -> int:
  """Dropout site ids: 0 is the embedding; layer l has 1 + 3 l (attention probabilities), 2 + 3 l (attention
  output), 3 + 3 l (MLP output)."""
  return 1 + 3 * layer + which


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


class Attention(nnx.Module):

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    d, std = cfg.n_embd, cfg.initializer_range
    self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
    self.c_attn = nnx.Linear(d, 3 * d, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=_normal(std),
                             rngs=rngs)
    self.c_proj = nnx.Linear(d, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             kernel_init=_normal(std / math.sqrt(2 * cfg.n_layer)), rngs=rngs)

  def __call__(self, x, bias, layer, cache, cache_index, dropout: Dropout | None = None, columns=None):
    """x [B,T,D], bias [B,T,Tk] -> [B,T,D], cache. Tk = T without a cache (self-attention over x), else the
    cache length. columns [T]: the sequence columns of x (for `dropout`)."""
    b, t, d = x.shape
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    q, k, v = (a.reshape(b, t, self.n_head, self.head_dim) for a in (q, k, v))
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B,H,T,Dh]
    if cache is not None:
      cache = cache.write(layer, cache_index, k, v)
      k, v = cache.k[layer], cache.v[layer]  # [B,H,Tk,Dh]
    scores = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim) + bias[:, None].astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if dropout is not None:
      probs = dropout.probs(probs, _site(layer, 0), columns)
    out = self.c_proj(jnp.einsum('bhqk,bhkd->bqhd', probs, v).reshape(b, t, d))
    return (out if dropout is None else dropout.hidden(out, _site(layer, 1), columns)), cache


class MLP(nnx.Module):

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    d, std = cfg.n_embd, cfg.initializer_range
    self.c_fc = nnx.Linear(d, 4 * d, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=_normal(std),
                           rngs=rngs)
    self.c_proj = nnx.Linear(4 * d, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             kernel_init=_normal(std / math.sqrt(2 * cfg.n_layer)), rngs=rngs)

  def __call__(self, x):
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))  # gelu_new


def _layer_norm(cfg: GPT2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """Mean and variance in float32 whatever the compute dtype (flax's LayerNorm promotes them); the output is cast
  to cfg.dtype."""
  return nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       use_fast_variance=False, rngs=rngs)


class Block(nnx.Module):

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ln_2 = _layer_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, bias, layer, cache, cache_index, dropout: Dropout | None = None, columns=None):
    a, cache = self.attn(self.ln_1(x), bias, layer, cache, cache_index, dropout, columns)
    x = x + a
    m = self.mlp(self.ln_2(x))
    return x + (m if dropout is None else dropout.hidden(m, _site(layer, 2), columns)), cache


class GPT2(nnx.Module):
  """GPT-2 trunk + tied LM head. `__call__` returns the final hidden states (after `ln_f`)."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    std = cfg.initializer_range
    self.wte = nnx.Embed(cfg.vocab_rows, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=_normal(std), rngs=rngs)
    self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=_normal(std), rngs=rngs)
    self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.ln_f = _layer_norm(cfg, rngs)
    if cfg.extra_tokens:  # created last: the other parameters draw the same random numbers as with K = 0
      self.think_in, self.think_out, self.think_bias = think_params(cfg, rngs)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens [...] int -> token embeddings [..., D] (no position embedding). Thinking ids (>= vocab_rows) read
    `think_in`; only the rows of ids actually fed get gradient."""
    if not self.cfg.extra_tokens:
      return lookup(self.wte, tokens)
    is_think = tokens >= self.cfg.vocab_rows
    text = lookup(self.wte, jnp.where(is_think, 0, tokens))  # [...,D]
    rows = jnp.clip(tokens - self.cfg.vocab_rows, 0, self.cfg.extra_tokens - 1)
    think = jnp.take(self.think_in[...], rows, axis=0).astype(text.dtype)  # [...,D]
    return jnp.where(is_think[..., None], think, text)

  def __call__(self, inputs_embeds, positions, bias, cache=None, cache_index=0, dropout: Dropout | None = None):
    """inputs_embeds [B,T,D], positions [B,T], bias [B,T,Tk] -> hidden [B,T,D] after ln_f, updated cache.
    The inputs are sequence columns [cache_index, cache_index + T) (`dropout`: training mode, else none)."""
    x = (inputs_embeds + self.wpe(positions)).astype(self.cfg.dtype)
    columns = None
    if dropout is not None:
      columns = cache_index + jnp.arange(x.shape[1])
      x = dropout.hidden(x, 0, columns)
    call = lambda block, layer, x, cache: block(x, bias, layer, cache, cache_index, dropout, columns)
    x, cache = run_blocks(self.h, x, cache, self.cfg.remat, call)
    return self.ln_f(x), cache

  def output_table(self) -> jax.Array:
    """The output layer's rows [vocab_rows, D] (the parameters, float32 master weights by default): the tied `wte`
    (Llama: `wte` or `lm_head`)."""
    return self.wte.embedding[...]

  def output_kernel(self) -> jax.Array:
    """The tied output layer as a [D, vocab_rows] array (a transposed copy of `wte`, in the compute dtype) for
    `logits(..., kernel=)`. XLA CPU runs the small-batch [B,D] x [D,V] dot ~1.6x faster than the same product
    against the [V,D] table (contracting both last dims), so a loop that computes logits every step (generation)
    makes this copy once, before the loop."""
    return self.output_table().astype(self.cfg.dtype).T

  def logits(self, hidden: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., vocab_rows + K]; padded rows are NEG_INF (never sampled). The last
    K columns (thinking tokens) are `hidden @ think_out.T + think_bias`. kernel: `output_kernel()`, made once by a
    caller that computes logits many times (same products, a faster dot layout on CPU)."""
    return output_logits(self, hidden, kernel)


def lookup(table: nnx.Embed, ids: jax.Array) -> jax.Array:
  """`table(ids)` [..., D]: the rows, then cast to the compute dtype (nnx.Embed casts the whole [V,D] table first:
  the same values, but a copy of the table per call and a bfloat16 gradient scatter)."""
  return jnp.take(table.embedding[...], ids, axis=0).astype(table.dtype)


def think_params(cfg, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param, nnx.Param]:
  """The K thinking tokens' untied rows in cfg.param_dtype: think_in [K,D], think_out [K,D], think_bias [K]."""
  k, std, dtype = cfg.extra_tokens, cfg.initializer_range, jnp.dtype(cfg.param_dtype)
  return (nnx.Param(_normal(std)(rngs.params(), (k, cfg.n_embd), dtype)),
          nnx.Param(_normal(std)(rngs.params(), (k, cfg.n_embd), dtype)), nnx.Param(jnp.zeros((k,), dtype)))


def output_logits(trunk, hidden: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
  """`logits` of either family's trunk: hidden [..., D] -> float32 [..., vocab_rows + K]. The products take their
  operands in the compute dtype and accumulate in float32 (a bfloat16 logit would be off by ~0.03 at |logit| ~ 8,
  enough to flip greedy choices and GRPO's importance ratios)."""
  cfg = trunk.cfg
  if kernel is None:
    kernel = trunk.output_kernel()
  logits = jnp.dot(hidden.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
  if cfg.extra_tokens:
    dtype = cfg.dtype
    think = jnp.dot(hidden.astype(dtype), trunk.think_out[...].astype(dtype).T, preferred_element_type=jnp.float32)
    logits = jnp.concatenate([logits, think + trunk.think_bias[...].astype(jnp.float32)], axis=-1)
  if cfg.num_tokens < cfg.vocab_rows:
    column = jnp.arange(cfg.total_rows)
    valid = (column < cfg.num_tokens) | (column >= cfg.vocab_rows)
    logits = jnp.where(valid, logits, NEG_INF)
  return logits


def causal_bias(key_mask: jax.Array, num_queries: int | None = None) -> jax.Array:
  """key_mask [B,T] (1 = real token) -> additive bias [B,Tq,T] for causal attention ending at the last key."""
  t = key_mask.shape[1]
  tq = t if num_queries is None else num_queries
  q_pos = jnp.arange(t - tq, t)[:, None]
  allowed = (jnp.arange(t)[None, :] <= q_pos)[None] & (key_mask[:, None, :] > 0)
  return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Left-padded mask [B,T] -> position ids [B,T]: 0 at the first real token (pads get 0 too)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
