"""The DTT model: GPT-2 plus a gate head that blends the previous hidden state into the next input (SPEC §3).

    l_t = w . h_{t-1} + b                       gate logit from the previous final hidden state (after ln_f)
    g_t = sigmoid((l_t + n_t) / tau),  n_t = log u - log(1 - u),  u ~ U(0, 1)      (Gumbel-sigmoid)
    x_t = g_t * P(h_{t-1}) + (1 - g_t) * E[y_t]                                     (blended input of position t)

The gate value g_t belongs to position t, whose input it blends. `P` is an optional d->d projection initialised
to the identity (seed 001). With `hard=True` the forward value is the 0/1 threshold of g and the gradient is the
soft one (straight-through). Evaluation uses noise n = 0 (deterministic).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dtt_jax.model.gpt2 import GPT2, GPT2Config


@dataclasses.dataclass(frozen=True)
class DTTConfig:
  gpt2: GPT2Config = GPT2Config()
  gate_bias_init: float = -4.0  # sigmoid(-4 / tau): 0.12 at tau 2, 0.02 at tau 1: the gate starts near 0
  use_projection: bool = False


def logistic_noise(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """n = log u - log(1 - u), u ~ U(0,1): the difference of two Gumbels (binary-concrete noise)."""
  u = jax.random.uniform(key, shape, dtype, minval=1e-6, maxval=1.0 - 1e-6)
  return jnp.log(u) - jnp.log1p(-u)


def gumbel_sigmoid(logit: jax.Array, noise: jax.Array, tau, hard: bool = False) -> jax.Array:
  """Relaxed Bernoulli sample in (0,1); `hard`: straight-through 0/1 value with the soft gradient."""
  soft = jax.nn.sigmoid((logit + noise) / tau)
  if not hard:
    return soft
  hard_value = (soft > 0.5).astype(soft.dtype)
  return soft + jax.lax.stop_gradient(hard_value - soft)


def blend(gate: jax.Array, latent: jax.Array, token_embedding: jax.Array) -> jax.Array:
  """gate [...], latent/token_embedding [..., D] -> g * latent + (1 - g) * embedding, [..., D]."""
  g = gate[..., None].astype(token_embedding.dtype)
  return g * latent.astype(token_embedding.dtype) + (1 - g) * token_embedding


class DTTModel(nnx.Module):

  def __init__(self, cfg: DTTConfig, *, rngs: nnx.Rngs, gpt2: GPT2 | None = None):
    """`gpt2`: an existing trunk (e.g. from `hf_io.load_pretrained`); otherwise one is built from `cfg.gpt2`."""
    self.cfg = cfg
    self.gpt2 = gpt2 if gpt2 is not None else GPT2(cfg.gpt2, rngs=rngs)
    d = self.gpt2.cfg.n_embd
    self.gate_head = nnx.Linear(d, 1, kernel_init=nnx.initializers.zeros,
                                bias_init=nnx.initializers.constant(cfg.gate_bias_init), rngs=rngs)
    identity = lambda _, shape, dtype: jnp.eye(*shape, dtype=dtype)
    self.proj = nnx.data(nnx.Linear(d, d, kernel_init=identity, rngs=rngs) if cfg.use_projection else None)

  def gate_logit(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> gate logit [...] (float32)."""
    return self.gate_head(hidden.astype(jnp.float32))[..., 0]

  def project(self, hidden: jax.Array) -> jax.Array:
    return hidden if self.proj is None else self.proj(hidden)

  def blended_input(self, prev_hidden, tokens, noise, tau, hard: bool = False):
    """prev_hidden [...,D], tokens [...] int, noise [...] -> (input embedding [...,D], gate [...])."""
    gate = gumbel_sigmoid(self.gate_logit(prev_hidden), noise, tau, hard)
    return blend(gate, self.project(prev_hidden), self.gpt2.embed(tokens)), gate
