"""The two-level inverse-CDF sampler draws from the right distribution; top-k/top-p truncate as specified."""

import jax
import jax.numpy as jnp
import numpy as np

from dtt_jax.sampling.sampler import SamplingConfig, inverse_cdf_sample, sample


def test_inverse_cdf_matches_probabilities():
  v = 300  # spans 3 blocks of 128, the last one partial
  probs = jax.random.uniform(jax.random.key(0), (v,)) ** 4
  probs = probs.at[5].set(0.0).at[200].set(0.0)
  n = 200_000
  draws = inverse_cdf_sample(jnp.broadcast_to(probs, (n, v)), jax.random.uniform(jax.random.key(1), (n,)))
  freq = np.bincount(np.asarray(draws), minlength=v) / n
  expected = np.asarray(probs / probs.sum())
  assert freq[5] == 0 and freq[200] == 0
  np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(expected.max() / n) + 1e-4)


def test_masked_rows_are_never_sampled():
  logits = jnp.full((4096, 256), -1e9).at[:, :3].set(0.0)
  toks, _ = sample(logits, jax.random.key(0), SamplingConfig(temperature=1.0))
  assert int(toks.max()) <= 2


def test_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 20000))
  toks, logp = sample(logits, jax.random.key(0), SamplingConfig(top_k=2))
  assert set(np.unique(toks)) == {0, 1}
  np.testing.assert_allclose(np.mean(toks == 0), 0.5 / 0.8, atol=0.01)
  np.testing.assert_allclose(logp[0], jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), rtol=1e-5)  # untruncated
  toks, _ = sample(logits, jax.random.key(1), SamplingConfig(top_p=0.85))  # keeps 0.5, 0.3, 0.15 (mass before 0.8)
  assert set(np.unique(toks)) == {0, 1, 2}
  toks, _ = sample(logits, jax.random.key(1), SamplingConfig(top_p=0.7))  # keeps 0.5, 0.3
  assert set(np.unique(toks)) == {0, 1}


def test_greedy_and_temperature():
  logits = jnp.array([[0.0, 2.0, 1.0]])
  toks, logp = sample(logits, jax.random.key(0), SamplingConfig(greedy=True))
  assert int(toks[0]) == 1
  np.testing.assert_allclose(logp, jax.nn.log_softmax(logits), rtol=1e-6)
  _, logp = sample(logits, jax.random.key(0), SamplingConfig(temperature=2.0))
  np.testing.assert_allclose(logp, jax.nn.log_softmax(logits / 2.0), rtol=1e-6)
