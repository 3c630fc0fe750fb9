"""The two-level inverse-CDF sampler draws from the right distribution; top-k/top-p truncate as specified."""

import jax
import jax.numpy as jnp
import numpy as np

from dtt_jax.sampling.sampler import SamplingConfig, inverse_cdf_sample, sample, token_logprob


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
  cfg = SamplingConfig(top_k=2)
  toks, lognorm = sample(logits, jax.random.key(0), cfg)
  assert set(np.unique(toks)) == {0, 1}
  np.testing.assert_allclose(np.mean(toks == 0), 0.5 / 0.8, atol=0.01)
  logp = token_logprob(logits, jnp.full((20000,), 2), lognorm, cfg)
  np.testing.assert_allclose(logp, np.log(0.15), rtol=1e-5)  # the untruncated distribution
  toks, _ = sample(logits, jax.random.key(1), SamplingConfig(top_p=0.85))  # keeps 0.5, 0.3, 0.15 (mass before 0.8)
  assert set(np.unique(toks)) == {0, 1, 2}
  toks, _ = sample(logits, jax.random.key(1), SamplingConfig(top_p=0.7))  # keeps 0.5, 0.3
  assert set(np.unique(toks)) == {0, 1}


def test_greedy_and_temperature():
  logits = jnp.array([[0.0, 2.0, 1.0]])
  all_tokens = jnp.arange(3)[:, None]
  for cfg, scale in ((SamplingConfig(greedy=True), 1.0), (SamplingConfig(temperature=2.0), 2.0)):
    toks, lognorm = sample(logits, jax.random.key(0), cfg)
    logp = jnp.stack([token_logprob(logits, t, lognorm, cfg) for t in all_tokens], -1)
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits / scale), rtol=1e-6)
  assert int(sample(logits, jax.random.key(0), SamplingConfig(greedy=True))[0][0]) == 1


def test_fast_argmax_equals_argmax():
  from dtt_jax.sampling.sampler import fast_argmax
  x = -jnp.abs(jax.random.normal(jax.random.key(0), (16, 300)))  # all negative, V not a multiple of 128
  x = x.at[3, 7].set(5.0).at[3, 250].set(5.0)  # a tie: the first maximum wins, as in jnp.argmax
  np.testing.assert_array_equal(fast_argmax(x), jnp.argmax(x, -1))
