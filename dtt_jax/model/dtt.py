"""The DTT model: a trunk (GPT-2 or Llama / Qwen2, `DTTModel.gpt2`) plus a gate that blends the previous hidden
state into the next input (SPEC §3).

`DTTConfig.gate` picks the gate (`config.model.gate`); both keep the interface
`blended_input(prev_hidden, tokens, noise, tau, hard) -> (input [...,D], gate [...])` used by the engine, the
bootstrap loss and GRPO.

'dtt' (default), a Gumbel-sigmoid gate head:

    l_t = w . h_{t-1} + b                       gate logit from the previous final hidden state (after ln_f)
    g_t = sigmoid((l_t + n_t) / tau),  n_t = log u - log(1 - u),  u ~ U(0, 1)      (Gumbel-sigmoid)
    x_t = g_t * P(h_{t-1}) + (1 - g_t) * E[y_t]                                     (blended input of position t)

The gate value g_t belongs to position t, whose input it blends. `P` is an optional d->d projection initialised
to the identity (seed 001). With `hard=True` the forward value is the 0/1 threshold of g and the gradient is the
soft one (straight-through). Evaluation uses noise n = 0 (deterministic).

'hrpo', the gated "thinking residual" of HRPO (arXiv 2505.18454, c = 8):

    p_t = softmax(logits(h_{t-1}) / tau)             next-token distribution of position t-1 (the output layer)
    z_t = E^T p_t / ||p_t||_2                         probability-weighted INPUT embedding rows (E = wte, also for an
                                                       untied Llama), normalised as HRPO does:
                                                       a one-hot p gives exactly E[y]; a spread p keeps the norm of
                                                       a sum of ~1/||p||^2 random rows near one row's norm
    r_t = sigmoid(W_r e_t + b_r),  i_t = sigmoid(W_i e_t + b_i),  e_t = E[y_t]      [D] each
    a_t = sigmoid(lam)^(c r_t) = exp(c r_t log sigmoid(lam))                          [D], in (0, 1)
    x_t = a_t * e_t + sqrt(1 - a_t^2) * (i_t * z_t)

W_r, W_i start at zero (r = i = 1/2 for every input), and lam so that a = sigmoid(lam)^(c/2) runs linearly over
`hrpo_a_init` = [0.99, 0.999] across the D dimensions: the input starts as the token embedding. (With r free in
(0,1) a spans (sigmoid(lam)^c, 1), so no lam bounds a for all r; zero W_r pins r at init.) The gate value
reported for position t is the latent weight mean_D sqrt(1 - a_t^2), in [0, 1] (0.044-0.14 per dimension at init):
the hinge loss, the reward's gate term and the metrics read it as the DTT gate. The HRPO gate is deterministic:
`noise` is ignored, and `hard` / GRPO's gate_as_action are rejected by the config check. It costs one extra
[D, V] matmul per position (the logits of h_{t-1}, recomputed inside the gate; [B,T,V] in `rescore`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dtt_jax.model.gpt2 import GPT2, GPT2Config
from dtt_jax.model.llama import Llama, LlamaConfig

GATES = ('dtt', 'hrpo')


@dataclasses.dataclass(frozen=True)
class DTTConfig:
  gpt2: GPT2Config | LlamaConfig = GPT2Config()  # the trunk (either family; the field keeps its historical name)
  gate_bias_init: float = -4.0  # sigmoid(-4 / tau): 0.12 at tau 2, 0.02 at tau 1: the gate starts near 0
  use_projection: bool = False
  gate: str = 'dtt'  # 'dtt' (Gumbel-sigmoid gate head) | 'hrpo' (HRPO's thinking-residual gate)
  hrpo_c: float = 8.0
  hrpo_a_init: tuple[float, float] = (0.99, 0.999)  # range of the initial a over the D dimensions

  def __post_init__(self):
    if self.gate not in GATES:
      raise ValueError(f'config.model.gate={self.gate!r}: expected one of {", ".join(map(repr, GATES))}.')
    lo, hi = self.hrpo_a_init
    if not 0 < lo <= hi < 1:
      raise ValueError(f'config.model.hrpo_a_init={self.hrpo_a_init}: expected 0 < low <= high < 1.')
    if self.hrpo_c <= 0:
      raise ValueError(f'config.model.hrpo_c={self.hrpo_c} must be > 0.')
    if self.gate == 'hrpo' and self.use_projection:
      raise ValueError('config.model.use_projection=True only applies to config.model.gate="dtt".')


PINNED = 1e4  # gate noise that pins a DTT gate to exactly 1 (sigmoid((logit + 1e4) / tau) rounds to 1 in float32)


def pin_noise(noise: jax.Array, tokens: jax.Array, pinned_id: int, pin_others: bool = False) -> jax.Array:
  """noise, tokens [...] -> the noise with PINNED where tokens == pinned_id (>= 0; -1: unchanged): the gate of those
  positions is 1, their input exactly P(h) (`config.model.pin_latent`: `<|latent|>` positions are continuous
  thoughts), with no gradient through the gate there; `pin_others`: -PINNED at every other token, whose gate is then
  0, its input exactly the token's embedding (`config.model.pin_text`: COCONUT's inputs). A rollout stores this
  noise, so re-scoring reproduces it."""
  if pinned_id < 0:
    return noise
  return jnp.where(tokens == pinned_id, PINNED, -PINNED if pin_others else noise)


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


def normalized_soft_embedding(logits: jax.Array, embedding: jax.Array, tau) -> jax.Array:
  """logits [..., V], embedding [V, D], tau broadcastable to [...] -> E^T p / ||p||_2 with p = softmax(logits / tau),
  [..., D] (float32)."""
  p = jax.nn.softmax(logits.astype(jnp.float32) / jnp.asarray(tau, jnp.float32)[..., None], axis=-1)
  norm = jnp.sqrt(jnp.sum(p * p, axis=-1, keepdims=True))  # >= 1/sqrt(V) > 0
  return (p @ embedding.astype(jnp.float32)) / norm


class HRPOGate(nnx.Module):
  """HRPO's thinking-residual gate (module docstring): parameters gate_r, gate_i (Linear D->D) and lam [D]."""

  def __init__(self, d: int, c: float, a_init: tuple[float, float], *, rngs: nnx.Rngs, param_dtype='float32'):
    self.c = c
    # computed in float32 whatever the parameters' dtype (they are float32 unless stored for inference in bfloat16)
    linear = lambda: nnx.Linear(d, d, dtype=jnp.float32, param_dtype=param_dtype, kernel_init=nnx.initializers.zeros,
                                rngs=rngs)
    self.gate_r, self.gate_i = linear(), linear()
    a0 = jnp.linspace(*a_init, d, dtype=jnp.float32)  # a at r = 1/2: sigmoid(lam) = a0^(2/c), lam = logit of that
    self.lam = nnx.Param(-jnp.log(jnp.expm1(-(2.0 / c) * jnp.log(a0))).astype(param_dtype))

  def coefficients(self, token_embedding: jax.Array):
    """e [..., D] -> (a, sqrt(1 - a^2), i), each [..., D] float32."""
    e = token_embedding.astype(jnp.float32)
    r = jax.nn.sigmoid(self.gate_r(e))
    log_a = self.c * r * jax.nn.log_sigmoid(self.lam[...].astype(jnp.float32))  # <= 0
    latent_weight = jnp.sqrt(jnp.maximum(-jnp.expm1(2.0 * log_a), 1e-12))  # sqrt(1 - a^2) without cancellation
    return jnp.exp(log_a), latent_weight, jax.nn.sigmoid(self.gate_i(e))

  def __call__(self, token_embedding: jax.Array, latent: jax.Array):
    """e, z [..., D] -> (a*e + sqrt(1-a^2)*(i*z) [..., D] in e's dtype, gate mean_D sqrt(1-a^2) [...])."""
    a, latent_weight, i = self.coefficients(token_embedding)
    x = a * token_embedding.astype(jnp.float32) + latent_weight * (i * latent.astype(jnp.float32))
    return x.astype(token_embedding.dtype), jnp.mean(latent_weight, axis=-1)


def build_trunk(cfg: GPT2Config | LlamaConfig, rngs: nnx.Rngs) -> GPT2 | Llama:
  """A fresh trunk of the family of `cfg`."""
  return (Llama if isinstance(cfg, LlamaConfig) else GPT2)(cfg, rngs=rngs)


class DTTModel(nnx.Module):

  def __init__(self, cfg: DTTConfig, *, rngs: nnx.Rngs, gpt2: GPT2 | Llama | None = None):
    """`gpt2`: an existing trunk of either family (e.g. from `hf_io.load_model`); otherwise one is built from
    `cfg.gpt2`. The attribute is `gpt2` for both families: checkpoints address the trunk's parameters by it."""
    self.cfg = cfg
    self.gpt2 = gpt2 if gpt2 is not None else build_trunk(cfg.gpt2, rngs)
    trunk = self.gpt2.cfg  # the gate's parameters are stored like the trunk's (param_dtype)
    d, param_dtype = trunk.n_embd, trunk.param_dtype
    dtt = cfg.gate == 'dtt'
    self.gate_head = nnx.data(nnx.Linear(d, 1, dtype=jnp.float32, param_dtype=param_dtype,
                                         kernel_init=nnx.initializers.zeros,
                                         bias_init=nnx.initializers.constant(cfg.gate_bias_init), rngs=rngs)
                              if dtt else None)  # the gate logit and sigmoid in float32
    identity = lambda _, shape, dtype: jnp.eye(*shape, dtype=dtype)
    self.proj = nnx.data(nnx.Linear(d, d, dtype=trunk.dtype, param_dtype=param_dtype, kernel_init=identity,
                                    rngs=rngs) if cfg.use_projection else None)  # a matmul: the compute dtype
    self.hrpo = nnx.data(None if dtt else HRPOGate(d, cfg.hrpo_c, cfg.hrpo_a_init, rngs=rngs,
                                                   param_dtype=param_dtype))

  def gate_logit(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> gate logit [...] (float32). The deterministic HRPO gate samples nothing and has no
    logit: zeros (GRPO's gate_as_action, their only user, is rejected for it)."""
    if self.gate_head is None:
      return jnp.zeros(hidden.shape[:-1], jnp.float32)
    return self.gate_head(hidden.astype(jnp.float32))[..., 0]

  def project(self, hidden: jax.Array) -> jax.Array:
    return hidden if self.proj is None else self.proj(hidden)

  def blended_input(self, prev_hidden, tokens, noise, tau, hard: bool = False):
    """prev_hidden [...,D], tokens [...] int, noise [...] -> (input embedding [...,D], gate [...])."""
    return self.blend_embedding(prev_hidden, self.gpt2.embed(tokens), noise, tau, hard)

  def blend_embedding(self, prev_hidden, token_embedding, noise, tau, hard: bool = False):
    """`blended_input` with the token embeddings [...,D] already looked up (a recurrence then gathers them once,
    outside its loop: a lookup inside a differentiated loop adds a dense [V,D] gradient every step)."""
    if self.hrpo is not None:
      # HRPO mixes the input embedding's rows (its get_input_embeddings()): wte, not output_table() (an untied
      # Llama's lm_head); the two are one table for GPT-2 and tied checkpoints
      latent = normalized_soft_embedding(self.gpt2.logits(prev_hidden), self.gpt2.wte.embedding[...], tau)
      return self.hrpo(token_embedding, latent)
    gate = gumbel_sigmoid(self.gate_logit(prev_hidden), noise, tau, hard)
    return blend(gate, self.project(prev_hidden), token_embedding), gate
