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


def inverse_cdf_sample(probs: jax.Array, u: jax.Array) -> jax.Array:
  """probs [B,V] unnormalised, >= 0; u [B] in [0,1) -> indices [B] with P(i) = probs[i] / sum(probs)."""
  b, v = probs.shape
  pad = -v % _BLOCK
  blocks = jnp.pad(probs, ((0, 0), (0, pad))).reshape(b, -1, _BLOCK)  # [B,NB,128]
  block_cdf = jnp.cumsum(blocks.sum(-1), axis=-1)  # [B,NB]
  target = u * block_cdf[:, -1]  # [B]
  nb = block_cdf.shape[1]
  block = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), nb - 1)  # [B]
  before = jnp.where(block > 0, jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], -1)[:, 0], 0.0)
  inner_cdf = before[:, None] + jnp.cumsum(jnp.take_along_axis(blocks, block[:, None, None], 1)[:, 0], -1)
  within = jnp.sum(inner_cdf <= target[:, None], axis=-1)
  index = block * _BLOCK + jnp.minimum(within, _BLOCK - 1)
  # Rounding can land on a zero-probability entry at a block edge; fall back to the block's argmax then.
  bad = jnp.take_along_axis(probs, jnp.minimum(index, v - 1)[:, None], -1)[:, 0] <= 0
  return jnp.where(bad, jnp.argmax(probs, -1), jnp.minimum(index, v - 1)).astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """logits [B,V] float32 -> (tokens [B] int32, log-softmax of logits/temperature [B,V]).

  The returned log-probabilities are those of the temperature-scaled distribution before top-k/top-p truncation
  (what re-scoring with the same temperature reproduces).
  """
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.log_softmax(logits, axis=-1)
  scaled = logits / cfg.temperature
  logp = jax.nn.log_softmax(scaled, axis=-1)
  kept = logp
  if cfg.top_k:
    kth = jax.lax.top_k(logp, cfg.top_k)[0][:, -1:]
    kept = jnp.where(logp < kth, -jnp.inf, kept)
  if cfg.top_p < 1.0:
    sorted_logp = jnp.sort(kept, axis=-1)[:, ::-1]
    mass_before = jnp.cumsum(jnp.exp(sorted_logp), axis=-1) - jnp.exp(sorted_logp)
    # smallest kept log-prob: the last sorted entry whose preceding mass is < top_p
    n_keep = jnp.maximum(jnp.sum(mass_before < cfg.top_p, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_logp, (n_keep - 1)[:, None], -1)
    kept = jnp.where(kept < threshold, -jnp.inf, kept)
  u = jax.random.uniform(key, logits.shape[:1])
  return inverse_cdf_sample(jnp.exp(kept), u), logp
