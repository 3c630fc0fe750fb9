"""Llama / Qwen2 in Flax NNX with HF numerics, behind the interface of `gpt2.GPT2` (one interface, two families).

What callers (the engine, the DTT gate, both training stages) rely on is exactly what `GPT2` offers:
  * `embed(tokens [...]) -> [..., D]`: token embeddings (no position term: RoPE acts inside attention).
  * `__call__(inputs_embeds [B,T,D], positions [B,T], bias [B,T,Tk], cache=None, cache_index=0, dropout=None)
    -> (hidden [B,T,D] after the final norm, cache)`. `positions` are the RoPE positions (`positions_from_mask`: 0 at
    a row's first real token under left padding), `bias` the additive attention bias, `cache` a `gpt2.KVCache`
    written at `cache_index` (then Tk = cache length).
  * `logits(hidden [..., D], kernel=None) -> float32 [..., vocab_rows + K]` (padded rows NEG_INF), `output_kernel()`
    (the output layer as [D, vocab_rows]); `output_table()` gives its [vocab_rows, D] rows: `wte` when the
    checkpoint ties embeddings, `lm_head` when not (GPT-2 is always tied, so its callers read `wte.embedding`).
  * `cfg` fields: vocab_rows, num_tokens, n_positions, n_embd, n_layer, n_head, head_dim, dtype, param_dtype,
    extra_tokens, total_rows. The token embedding is named `wte` (HF `model.embed_tokens`) because callers address
    it by name.

Architecture (HF LlamaForCausalLM, Qwen2ForCausalLM), pre-norm blocks and a final `norm`:
    x += o_proj(attention(rope(q_proj(a)), rope(k_proj(a)), v_proj(a))),  a = input_layernorm(x)
    x += down_proj(silu(gate_proj(m)) * up_proj(m)),                       m = post_attention_layernorm(x)
RMSNorm in float32: w * x / sqrt(mean(x^2) + eps). Grouped-query attention: query head h reads key/value head
h // (n_head / n_kv_head). RoPE in HF's rotate-half layout: inv_freq_i = theta^(-2i / Dh) (i < Dh / 2), rescaled by
`rope_scaling` ('linear': / factor; 'llama3': Llama 3.1's wavelength bands), angle = position * inv_freq in float32.
Biases: Qwen2's q/k/v (`qkv_bias`), Llama's `attention_bias` (q/k/v and o), `mlp_bias`. Linear kernels are
[in, out] (HF's [out, in] weights transposed by `hf_io`).

KV cache: per layer [B, heads, cache_len, Dh]. `kv_cache` (and `gpt2.kv_cache_for`, which the engine and the training
stages allocate with) sizes it by n_kv_head (each kv head stored once); `gpt2.KVCache.zeros(cfg, ...)` sizes it by
n_head and is accepted too: the layer then stores each kv head repeated for its query heads (the same numbers,
n_head / n_kv_head times the memory).

Thinking tokens (`extra_tokens` = K > 0) and dropout behave as in `gpt2.py`: K untied rows `think_in`, `think_out`,
`think_bias`; a dropout object (`gpt2.Dropout`) at GPT-2's sites (embedding, attention probabilities, attention and
MLP outputs), masks keyed by sequence column. HF Llama's own training mode drops only attention probabilities
(`attention_dropout`, 0 in released checkpoints); the GPT-2 sites keep one dropout setting meaning one thing.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtt_jax.model.blocks import check_remat, run_blocks
from dtt_jax.model.gpt2 import KVCache, check_precision, lookup, output_logits, think_params

FAMILIES = ('llama', 'qwen2')
ROPE_TYPES = ('default', 'linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_rows: int = 32000  # embedding rows (padded to a multiple of 128)
  num_tokens: int = 32000  # real rows; logits of rows >= num_tokens are masked
  n_positions: int = 2048  # HF max_position_embeddings (RoPE itself has no table)
  n_embd: int = 4096  # hidden_size
  n_layer: int = 32
  n_head: int = 32  # query heads
  n_kv_head: int = 32  # key/value heads (grouped-query attention when < n_head)
  head_dim: int = 128
  intermediate_size: int = 11008
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, object], ...] = ()  # sorted (key, value) items of HF's rope scaling; () = none
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2: True
  o_bias: bool = False  # Llama attention_bias: q/k/v and o
  mlp_bias: bool = False
  family: str = 'llama'  # 'llama' | 'qwen2': the HF class an export names
  initializer_range: float = 0.02
  dtype: str = 'float32'  # compute dtype of matmuls and attention ('bfloat16' on accelerators)
  param_dtype: str = 'float32'  # stored parameters: float32 master weights ('bfloat16': inference only)
  extra_tokens: int = 0  # K thinking tokens: ids vocab_rows + j (j < K), untied rows think_in / think_out
  remat: str = 'none'  # 'none' | 'block' | 'dots': rematerialization of the blocks (`blocks.py`)

  @property
  def total_rows(self) -> int:
    """Logit columns: vocab_rows, then the K thinking tokens."""
    return self.vocab_rows + self.extra_tokens

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'LlamaConfig.family={self.family!r}: expected one of {FAMILIES}.')
    if self.n_head % self.n_kv_head:
      raise ValueError(f'num_attention_heads={self.n_head} is not a multiple of num_key_value_heads='
                       f'{self.n_kv_head}.')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for RoPE.')
    if not 0 < self.num_tokens <= self.vocab_rows:
      raise ValueError(f'num_tokens={self.num_tokens} must be in (0, vocab_rows={self.vocab_rows}].')
    if self.extra_tokens < 0:
      raise ValueError(f'extra_tokens={self.extra_tokens} (config.think.num_tokens) must be >= 0.')
    rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)  # a bad rope_scaling fails here, by name
    check_precision(self.dtype, self.param_dtype)
    check_remat(self.remat)


@functools.lru_cache(maxsize=None)
def rope_inv_freq(head_dim: int, theta: float, scaling: tuple[tuple[str, object], ...] = ()) -> np.ndarray:
  """-> float32 [head_dim / 2] inverse frequencies, as transformers' `ROPE_INIT_FUNCTIONS` compute them."""
  params = dict(scaling)
  kind = params.get('rope_type', params.get('type', 'default'))
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if kind == 'default':
    pass
  elif kind == 'linear':
    inv_freq = inv_freq / _need(params, 'factor', kind)
  elif kind == 'llama3':
    factor, low, high, old_len = (_need(params, k, kind) for k in
                                  ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'))
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  else:
    raise ValueError(f'rope_scaling / rope_parameters rope_type={kind!r} is not supported; supported: '
                     f'{", ".join(ROPE_TYPES)} (convert the checkpoint or add the type to model/llama.py).')
  return inv_freq.astype(np.float32)


def _need(params: dict, key: str, kind: str) -> float:
  if key not in params:
    raise ValueError(f'rope_scaling (rope_type={kind!r}) lacks the key {key!r}.')
  return float(params[key])


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B,H,T,Dh], cos/sin [B,T,Dh/2] float32 -> x rotated in HF's rotate-half layout, x's dtype."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B,H,T,Dh/2] each
  c, s = cos[:, None], sin[:, None]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def kv_cache(cfg: LlamaConfig, batch: int, length: int) -> KVCache:
  """A zero cache with n_kv_head heads per layer, [B, n_kv_head, length, head_dim] (GQA's memory saving)."""
  return KVCache.zeros(cfg, batch, length, cfg.n_kv_head)


def _site(layer: int, which: int) -> int:
  """Dropout sites as in gpt2.py: 0 the embedding; layer l: 1 + 3 l probabilities, 2 + 3 l attention output,
  3 + 3 l MLP output."""
  return 1 + 3 * layer + which


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


def _linear(cfg: LlamaConfig, d_in: int, d_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=_normal(cfg.initializer_range), rngs=rngs)


class RMSNorm(nnx.Module):
  """HF LlamaRMSNorm: normalised in float32 (whatever the compute dtype), cast back, times `weight` [D]."""

  def __init__(self, cfg: LlamaConfig):
    self.eps = cfg.rms_norm_eps
    self.weight = nnx.Param(jnp.ones((cfg.n_embd,), cfg.param_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    d, q_dim, kv_dim = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    self.q_proj = _linear(cfg, d, q_dim, cfg.qkv_bias, rngs)
    self.k_proj = _linear(cfg, d, kv_dim, cfg.qkv_bias, rngs)
    self.v_proj = _linear(cfg, d, kv_dim, cfg.qkv_bias, rngs)
    self.o_proj = _linear(cfg, q_dim, d, cfg.o_bias, rngs)

  def __call__(self, x, cos, sin, bias, layer, cache, cache_index, dropout=None, columns=None):
    """x [B,T,D], cos/sin [B,T,Dh/2], bias [B,T,Tk] -> [B,T,D], cache (module docstring: either head layout)."""
    b, t, _ = x.shape
    heads = lambda a, n: a.reshape(b, t, n, self.head_dim).transpose(0, 2, 1, 3)  # [B,n,T,Dh]
    q = apply_rope(heads(self.q_proj(x), self.n_head), cos, sin)
    k = apply_rope(heads(self.k_proj(x), self.n_kv_head), cos, sin)
    v = heads(self.v_proj(x), self.n_kv_head)
    if cache is not None:
      if cache.k[layer].shape[1] != self.n_kv_head:  # a cache sized by n_head (gpt2.KVCache.zeros)
        k, v = (jnp.repeat(a, self.n_head // self.n_kv_head, axis=1) for a in (k, v))
      cache = cache.write(layer, cache_index, k, v)
      k, v = cache.k[layer], cache.v[layer]  # [B,Hkv,Tk,Dh], Hkv = n_kv_head or n_head
    hkv = k.shape[1]
    group = self.n_head // hkv
    q = q.reshape(b, hkv, group, t, self.head_dim)  # query head h = kv head h // group, member h % group
    scores = jnp.einsum('bkgqd,bksd->bkgqs', q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim) + bias[:, None, None].astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B,Hkv,G,T,Tk]
    if dropout is not None:
      probs = dropout.probs(probs.reshape(b, self.n_head, t, -1), _site(layer, 0), columns).reshape(probs.shape)
    out = jnp.einsum('bkgqs,bksd->bqkgd', probs, v).reshape(b, t, self.n_head * self.head_dim)
    out = self.o_proj(out)
    return (out if dropout is None else dropout.hidden(out, _site(layer, 1), columns)), cache


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = cfg.n_embd, cfg.intermediate_size
    self.gate_proj = _linear(cfg, d, f, cfg.mlp_bias, rngs)
    self.up_proj = _linear(cfg, d, f, cfg.mlp_bias, rngs)
    self.down_proj = _linear(cfg, f, d, cfg.mlp_bias, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, bias, layer, cache, cache_index, dropout=None, columns=None):
    a, cache = self.self_attn(self.input_layernorm(x), cos, sin, bias, layer, cache, cache_index, dropout, columns)
    x = x + a
    m = self.mlp(self.post_attention_layernorm(x))
    return x + (m if dropout is None else dropout.hidden(m, _site(layer, 2), columns)), cache


class Llama(nnx.Module):
  """Llama / Qwen2 trunk + output layer with `GPT2`'s interface (module docstring). `__call__` returns the final
  hidden states (after `norm`)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    std = cfg.initializer_range
    self.wte = nnx.Embed(cfg.vocab_rows, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=_normal(std), rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.norm = RMSNorm(cfg)
    # HF's lm_head.weight [V, D] as an Embed table: the output layer reads it as the tied case reads `wte`
    self.lm_head = nnx.data(None if cfg.tie_word_embeddings else
                            nnx.Embed(cfg.vocab_rows, cfg.n_embd, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                      embedding_init=_normal(std), rngs=rngs))
    if cfg.extra_tokens:  # created last, as in GPT2
      self.think_in, self.think_out, self.think_bias = think_params(cfg, rngs)  # [K,D], [K,D], [K]

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens [...] int -> token embeddings [..., D]. Thinking ids (>= vocab_rows) read `think_in`."""
    if not self.cfg.extra_tokens:
      return lookup(self.wte, tokens)
    is_think = tokens >= self.cfg.vocab_rows
    text = lookup(self.wte, jnp.where(is_think, 0, tokens))  # [...,D]
    rows = jnp.clip(tokens - self.cfg.vocab_rows, 0, self.cfg.extra_tokens - 1)
    think = jnp.take(self.think_in[...], rows, axis=0).astype(text.dtype)  # [...,D]
    return jnp.where(is_think[..., None], think, text)

  def __call__(self, inputs_embeds, positions, bias, cache=None, cache_index=0, dropout=None):
    """inputs_embeds [B,T,D], positions [B,T], bias [B,T,Tk] -> hidden [B,T,D] after `norm`, updated cache.
    The inputs are sequence columns [cache_index, cache_index + T) (`dropout`: training mode, else none)."""
    cfg = self.cfg
    inv_freq = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))  # [Dh/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,Dh/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x = inputs_embeds.astype(cfg.dtype)
    columns = None
    if dropout is not None:
      columns = cache_index + jnp.arange(x.shape[1])
      x = dropout.hidden(x, 0, columns)
    call = lambda block, layer, x, cache: block(x, cos, sin, bias, layer, cache, cache_index, dropout, columns)
    x, cache = run_blocks(self.layers, x, cache, cfg.remat, call)
    return self.norm(x), cache

  def output_embed(self) -> nnx.Embed:
    """The output layer's table module: `wte` when tied, else `lm_head`."""
    return self.wte if self.lm_head is None else self.lm_head

  def output_table(self) -> jax.Array:
    """The output layer's rows [vocab_rows, D] (the parameters), e.g. for a tiled cross-entropy."""
    return self.output_embed().embedding[...]

  def output_kernel(self) -> jax.Array:
    """The output layer as [D, vocab_rows] in the compute dtype, for `logits(..., kernel=)` (see GPT2)."""
    return self.output_table().astype(self.cfg.dtype).T

  def logits(self, hidden: jax.Array, kernel: jax.Array | None = None) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., vocab_rows + K]; padded rows are NEG_INF (as GPT2.logits)."""
    return output_logits(self, hidden, kernel)
