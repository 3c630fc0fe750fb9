"""The DTT gate: Gumbel-sigmoid values, temperature limit, straight-through gradient, the blend formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtt_jax.model.dtt import DTTConfig, DTTModel, blend, gumbel_sigmoid, logistic_noise
from dtt_jax.model.gpt2 import GPT2Config

TINY = GPT2Config(vocab_rows=128, num_tokens=100, n_positions=32, n_embd=16, n_layer=1, n_head=2)


def test_gate_values_in_open_interval():
  logits = jnp.linspace(-8.0, 8.0, 1001)
  noise = logistic_noise(jax.random.key(0), logits.shape)
  g = gumbel_sigmoid(logits, noise, tau=1.0)
  chex.assert_shape(g, (1001,))
  assert bool(jnp.all((g > 0) & (g < 1)))


def test_samples_become_binary_as_temperature_goes_to_zero():
  logits = jax.random.normal(jax.random.key(1), (20000,))
  noise = logistic_noise(jax.random.key(2), logits.shape)
  far_from_binary = lambda tau: float(jnp.mean(jnp.minimum(*(lambda g: (g, 1 - g))(gumbel_sigmoid(logits, noise, tau)))))
  assert far_from_binary(1e-3) < 1e-3 < far_from_binary(1.0)
  # Sampled frequency of g > 0.5 equals sigmoid(logit) (binary-concrete property), checked at logit 0.7.
  g = gumbel_sigmoid(jnp.full((200000,), 0.7), logistic_noise(jax.random.key(3), (200000,)), 0.01)
  np.testing.assert_allclose(float(jnp.mean(g > 0.5)), float(jax.nn.sigmoid(0.7)), atol=0.005)


def test_straight_through_is_binary_with_nonzero_gradient():
  logits = jnp.array([-0.3, 0.2, 1.5])
  noise = jnp.zeros(3)
  hard = gumbel_sigmoid(logits, noise, 0.5, hard=True)
  np.testing.assert_array_equal(hard, [0.0, 1.0, 1.0])
  grad = jax.grad(lambda l: jnp.sum(gumbel_sigmoid(l, noise, 0.5, hard=True)))(logits)
  soft_grad = jax.grad(lambda l: jnp.sum(gumbel_sigmoid(l, noise, 0.5)))(logits)
  np.testing.assert_allclose(grad, soft_grad, rtol=1e-6)
  assert bool(jnp.all(grad != 0))


def test_deterministic_mode_is_plain_sigmoid():
  logits = jnp.array([-1.0, 0.0, 2.0])
  np.testing.assert_allclose(gumbel_sigmoid(logits, jnp.zeros(3), 0.5), jax.nn.sigmoid(logits / 0.5), rtol=1e-6)


def test_blend_equals_formula():
  g = jnp.array([0.0, 0.25, 1.0])
  h = jnp.arange(12.0).reshape(3, 4)
  e = -jnp.ones((3, 4))
  out = blend(g, h, e)
  chex.assert_shape(out, (3, 4))
  np.testing.assert_allclose(out, g[:, None] * h + (1 - g[:, None]) * e)


def test_model_gate_starts_near_zero_and_projection_is_identity():
  model = DTTModel(DTTConfig(TINY, use_projection=True), rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.key(0), (4, 16))
  tokens = jnp.array([3, 4, 5, 6])
  x, gate = model.blended_input(h, tokens, jnp.zeros(4), tau=1.0)
  chex.assert_shape((x, gate), ((4, 16), (4,)))
  np.testing.assert_allclose(gate, jax.nn.sigmoid(-4.0), rtol=1e-6)  # bias init -4, zero kernel: near 0
  np.testing.assert_allclose(model.project(h), h, rtol=1e-6)
  np.testing.assert_allclose(x, blend(gate, h, model.gpt2.embed(tokens)), rtol=1e-6)
