"""Token sampling from logits: greedy, temperature, top-k, top-p.

Sampling uses a two-level inverse CDF (block sums of 128 probabilities, then one block): it needs one uniform number
per row instead of one per vocabulary entry (categorical/Gumbel-max over 50k logits costs ~5x the tiny model's
output matmul on CPU), and no O(V) cumsum.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1.0: off


def _blocks(x: jax.Array, fill: float = 0.0) -> jax.Array:
  """[B,V] -> [B,ceil(V/128),128], padding the vocabulary axis with `fill`."""
  b, v = x.shape
  return jnp.pad(x, ((0, 0), (0, -v % _BLOCK)), constant_values=fill).reshape(b, -1, _BLOCK)


def _pick(blocks: jax.Array, block: jax.Array) -> jax.Array:
  """blocks [B,NB,128], block [B] -> that block of each row, [B,128]."""
  return jnp.take_along_axis(blocks, block[:, None, None], 1)[:, 0]


def fast_argmax(x: jax.Array) -> jax.Array:
  """argmax over the last axis of [B,V] (first maximum), via block maxima: XLA's CPU argmax over 50k columns is a
  slow variadic reduction (7 ms at B=64, two thirds of the output matmul)."""
  blocks = _blocks(x, -jnp.inf)
  block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
  return (block * _BLOCK + jnp.argmax(_pick(blocks, block), axis=-1)).astype(jnp.int32)


def inverse_cdf_sample(probs: jax.Array, u: jax.Array) -> jax.Array:
  """probs [B,V] unnormalised, >= 0; u [B] in [0,1) -> indices [B] with P(i) = probs[i] / sum(probs)."""
  blocks = _blocks(probs)  # [B,NB,128]
  block_cdf = jnp.cumsum(blocks.sum(-1), axis=-1)  # [B,NB]
  target = u * block_cdf[:, -1]  # [B]
  block = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), block_cdf.shape[1] - 1)  # [B]
  before = jnp.where(block > 0, jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], -1)[:, 0], 0.0)
  inner = _pick(blocks, block)  # [B,128]
  within = jnp.minimum(jnp.sum(before[:, None] + jnp.cumsum(inner, -1) <= target[:, None], axis=-1), _BLOCK - 1)
  # Rounding can land on a zero-probability entry at a block edge: take the block's most likely entry then.
  zero = jnp.take_along_axis(inner, within[:, None], -1)[:, 0] <= 0
  within = jnp.where(zero, jnp.argmax(inner, -1), within)
  return (block * _BLOCK + within).astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """logits [B,V] float32 -> (tokens [B] int32, log-normaliser [B]).

  The log-probability of any token y under the temperature-scaled policy is `logits[y] / temperature - lognorm`
  (`token_logprob`): that of the distribution before top-k/top-p truncation, which re-scoring with the same
  temperature reproduces. No [B,V] log-softmax is materialised (it was a third of a tiny model's step).
  """
  temperature = 1.0 if cfg.greedy else cfg.temperature
  scaled = logits / temperature
  top = jnp.max(scaled, axis=-1, keepdims=True)
  probs = jnp.exp(scaled - top)  # unnormalised, [B,V]
  lognorm = top[:, 0] + jnp.log(jnp.sum(probs, axis=-1))
  if cfg.greedy:
    return fast_argmax(logits), lognorm
  if cfg.top_k:
    kth = jax.lax.top_k(scaled, cfg.top_k)[0][:, -1:]
    probs = jnp.where(scaled < kth, 0.0, probs)
  if cfg.top_p < 1.0:
    sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]  # [B,V] unnormalised, descending
    cumulative = jnp.cumsum(sorted_probs, axis=-1)
    mass_before = cumulative - sorted_probs
    # keep the smallest prefix of the sorted tokens whose mass reaches top_p (at least one token), and every token
    # tied with the last one kept. The threshold is an entry of `probs` itself: one recomputed from normalised
    # probabilities (p / sum * sum) can land a float32 step above the crossing token and drop it.
    n_keep = jnp.maximum(jnp.sum(mass_before < cfg.top_p * cumulative[:, -1:], axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_probs, (n_keep - 1)[:, None], -1)  # [B,1]
    probs = jnp.where(probs < threshold, 0.0, probs)
  u = jax.random.uniform(key, logits.shape[:1])
  return inverse_cdf_sample(probs, u), lognorm


def token_logprob(logits: jax.Array, tokens: jax.Array, lognorm: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """logits [B,V], tokens [B], lognorm [B] from `sample` -> log p(tokens) [B]."""
  temperature = 1.0 if cfg.greedy else cfg.temperature
  return jnp.take_along_axis(logits, tokens[:, None], -1)[:, 0] / temperature - lognorm
