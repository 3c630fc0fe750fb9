"""GRPO (SPEC §7): the loss equals its formula, mu=1 is the policy gradient, 4 devices equal 1, the reference is
frozen, rollouts keep groups on one device and re-score to their own log-probs."""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dtt_jax import parallel, pipeline, tokens
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2Config
from dtt_jax.rl import grpo, rollout
from dtt_jax.sampling import engine
from dtt_jax.train import state as state_lib

VOCAB = tokens.Vocab.compact([range(1000, 1095)])  # 100 tokens (eos 0, bot 1, eot 2, ...), 128 rows
TINY = GPT2Config(vocab_rows=VOCAB.num_rows, num_tokens=VOCAB.num_tokens, n_positions=64, n_embd=32, n_layer=2,
                  n_head=4)
B, G, P, T = 4, 4, 6, 10
TAU = 0.7
CFG = grpo.GRPOConfig(num_generations=G, beta=0.1, temperature=0.8, max_new_tokens=T, max_think=3)


def _model(seed: int = 0) -> DTTModel:
  """Gate head with random weights and bias 0: gates spread over (0,1), the latent path is exercised."""
  model = DTTModel(DTTConfig(TINY, gate_bias_init=0.0, use_projection=True), rngs=nnx.Rngs(seed))
  model.gate_head.kernel.value = 0.5 * jax.random.normal(jax.random.key(seed + 1), (TINY.n_embd, 1))
  return model


def _prompts(b: int = B, seed: int = 0):
  """[b,P] left-padded prompts of 2..P tokens."""
  rng = np.random.RandomState(seed)
  prompt = np.zeros((b, P), np.int32)
  mask = np.zeros((b, P), np.int32)
  for i in range(b):
    n = rng.randint(2, P + 1)
    prompt[i, P - n:] = rng.randint(5, VOCAB.num_tokens, n)
    mask[i, P - n:] = 1
  return prompt, mask


def _rewards(seed: int = 0) -> np.ndarray:
  """[B*G] rewards; group 1 has all rewards equal (zero spread)."""
  r = np.random.RandomState(seed).randn(B, G).astype(np.float32)
  r[1] = 0.25
  return r.reshape(-1)


@functools.lru_cache(maxsize=None)
def _policy_and_reference():
  """-> (graphdef, policy params, a different reference's params), host copies."""
  graphdef, params = state_lib.split_model(_model(0))
  _, ref_params = state_lib.split_model(_model(7))
  return graphdef, jax.device_get(params), jax.device_get(ref_params)


def _rollout_settings(cfg: grpo.GRPOConfig) -> grpo.GRPOConfig:
  """The fields a rollout depends on (loss-only fields reset), so rollouts are shared between loss settings."""
  return dataclasses.replace(cfg, mu=1, loss_agg='grpo', gate_as_action=False, drop_zero_std_groups=False,
                             score_blended_tokens=True, rescore='parallel')


@functools.lru_cache(maxsize=None)
def _rollout_fn(cfg: grpo.GRPOConfig, num_devices: int):
  graphdef, _, _ = _policy_and_reference()
  return rollout.make_rollout_fn(graphdef, _rollout_settings(cfg), VOCAB, parallel.make_mesh(num_devices))


def _as_batch(out, ref_logprobs, prompt, mask, rewards) -> rollout.RolloutBatch:
  """Engine output + rewards [N] -> a host RolloutBatch (inner span: positions 2, 3)."""
  out, ref_logprobs = jax.device_get((out, ref_logprobs))
  n = rewards.shape[0]
  inner = np.zeros((n, T), np.float32)
  inner[:, 2:4] = out.mask[:, 2:4]
  return rollout.RolloutBatch(
      prompt=np.asarray(prompt), prompt_mask=np.asarray(mask), completion=out.tokens, completion_mask=out.mask,
      forced=out.forced, logprobs=out.logprobs, ref_logprobs=ref_logprobs, gates=out.gates,
      gate_noise=out.gate_noise, hidden_inputs=out.hidden_inputs, inner_mask=inner,
      outer_mask=(out.mask - inner).astype(np.float32), tau=np.full((n,), TAU, np.float32), rewards=rewards,
      stats={'accuracy': (rewards > 0).astype(np.float32)})


@functools.lru_cache(maxsize=None)
def _cached_batch(cfg: grpo.GRPOConfig, seed: int) -> rollout.RolloutBatch:
  _, params, ref_params = _policy_and_reference()
  prompt, mask = rollout.repeat_prompts(*_prompts(seed=seed), G)
  out, ref_logprobs = _rollout_fn(cfg, 1)(params, ref_params, prompt, mask, jax.random.key(seed), jnp.float32(TAU))
  return _as_batch(out, ref_logprobs, prompt, mask, _rewards(seed))


def make_batch(cfg=CFG, seed: int = 0) -> rollout.RolloutBatch:
  """A real rollout of the policy (B prompts x G, engine + reference re-score) with synthetic rewards, on the host."""
  return _cached_batch(_rollout_settings(cfg), seed)


def _assert_trees_close(a, b, atol, rtol=0.0):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


def _blended_positions(batch: rollout.RolloutBatch) -> rollout.RolloutBatch:
  """Half the positions inner, gates on both sides of 0.5 (only the loss reads these two, to find blended tokens)."""
  rng = np.random.RandomState(2)
  batch = batch.replace(inner_mask=(rng.rand(*batch.gates.shape) < 0.5).astype(np.float32),
                        gates=rng.rand(*batch.gates.shape).astype(np.float32))
  blended_real = (batch.inner_mask > 0) & (batch.gates >= 0.5) & (np.asarray(batch.completion_mask) > 0)
  assert 0 < blended_real.sum() < np.asarray(batch.completion_mask).sum()
  return batch



# ------------------------------------------------------------------------------------------- NumPy reference


def _model_scores(graphdef, params, batch):
  """Per-token log p [N,T] (full log-softmax of logits / temperature) and gate logits [N,T], written out plainly."""
  model = nnx.merge(graphdef, params)
  b = jax.tree.map(jnp.asarray, batch)
  target_hidden, _ = engine.rescore(model, b.prompt, b.prompt_mask, b.completion, b.hidden_inputs, b.gate_noise,
                                    b.tau[:, None])
  logp_all = jax.nn.log_softmax(model.gpt2.logits(target_hidden) / CFG.temperature)
  logp = jnp.take_along_axis(logp_all, b.completion[..., None], -1)[..., 0]
  return logp, model.gate_logit(b.hidden_inputs)


def numpy_grpo_loss(logp, old_logp, gate_logit, old_gate_logit, batch, cfg) -> float:
  """The GRPO objective in float64 NumPy, from per-token log-probs and gate logits."""
  logp, old_logp, gate_logit, old_gate_logit = (np.asarray(x, np.float64) for x in
                                                (logp, old_logp, gate_logit, old_gate_logit))
  r = np.asarray(batch.rewards, np.float64).reshape(-1, cfg.num_generations)
  zero = r.max(1) == r.min(1)
  adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
  adv[zero] = 0.0
  adv = adv.reshape(-1, 1)
  sampled = (np.asarray(batch.completion_mask) > 0) & (np.asarray(batch.forced) == 0)
  mask = sampled.copy()
  if cfg.drop_zero_std_groups:  # out of the sum, not out of the normalisers
    mask &= ~np.repeat(zero, cfg.num_generations)[:, None]
  mask, sampled = mask.astype(np.float64), sampled.astype(np.float64)
  scored = np.ones(logp.shape, bool)
  if not cfg.score_blended_tokens:  # the token leaves the action at blended inner positions
    scored = ~((np.asarray(batch.inner_mask) > 0) & (np.asarray(batch.gates) >= 0.5))
  act, old_act = np.where(scored, logp, 0.0), np.where(scored, old_logp, 0.0)
  if cfg.gate_as_action:
    tau = np.asarray(batch.tau, np.float64)[:, None]
    z = (old_gate_logit + np.asarray(batch.gate_noise, np.float64)) / tau  # logit of the stored gate sample

    def log_pdf(l):  # density of z = (l + logistic noise) / tau
      x = tau * z - l
      return np.log(tau * np.exp(-x) / (1 + np.exp(-x)) ** 2)

    act, old_act = act + log_pdf(gate_logit), old_act + log_pdf(old_gate_logit)
  ratio = np.exp(act - old_act)
  surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
  if not cfg.gate_as_action:  # no action left at the positions whose token is not scored
    surrogate[~scored] = 0.0
  ref = np.asarray(batch.ref_logprobs, np.float64)
  kl = np.exp(ref - logp) - (ref - logp) - 1
  per_token = (-surrogate + cfg.beta * kl) * mask
  if cfg.loss_agg == 'grpo':
    rows = sampled.sum(1) > 0
    return float((per_token.sum(1)[rows] / sampled.sum(1)[rows]).mean())
  if cfg.loss_agg == 'dapo':
    return float(per_token.sum() / sampled.sum())
  return float(per_token.sum() / (mask.shape[0] * mask.shape[1]))


@pytest.mark.parametrize('loss_agg,gate_as_action,drop,blended', [
    ('grpo', False, False, True), ('dapo', False, False, True), ('dr_grpo', False, False, True),
    ('grpo', True, False, True), ('dapo', True, True, True), ('grpo', False, True, True), ('grpo', False, False, False),
    ('dapo', True, False, False)])
def test_loss_equals_numpy_reference(loss_agg, gate_as_action, drop, blended):
  """On a fixed rollout with old log-probs away from the current ones (ratios inside and outside the clip range),
  the loss is the NumPy GRPO objective for every aggregation, with/without the gate action, dropped groups and the
  policy-gradient term at blended inner tokens."""
  cfg = dataclasses.replace(CFG, loss_agg=loss_agg, gate_as_action=gate_as_action, drop_zero_std_groups=drop,
                            score_blended_tokens=blended)
  graphdef, params, ref_params = _policy_and_reference()
  batch = make_batch(cfg)
  if not blended:
    batch = _blended_positions(batch)
  logp, gate_logit = _model_scores(graphdef, params, batch)
  rng = np.random.RandomState(1)
  old_logp = np.asarray(logp) + 0.3 * rng.randn(*logp.shape).astype(np.float32)
  old_gate_logit = np.asarray(gate_logit) + 0.5 * rng.randn(*gate_logit.shape).astype(np.float32)
  advantages, zero_std = grpo.group_advantages(jnp.asarray(batch.rewards), G)
  mask = grpo.loss_mask(jax.tree.map(jnp.asarray, batch), zero_std, cfg)
  loss, (aux, _) = grpo.grpo_loss(params, graphdef, jax.tree.map(jnp.asarray, batch), advantages, mask,
                                  jnp.asarray(old_logp), jnp.asarray(old_gate_logit), False, cfg)
  expected = numpy_grpo_loss(logp, old_logp, gate_logit, old_gate_logit, batch, cfg)
  # atol: the float32 sum of O(1) terms of both signs (this case's loss is 1.8e-3)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-7)
  assert 0.0 < float(aux['clip_fraction']) < 1.0  # both branches of the clip are exercised
  if drop:  # dropping changes the objective (group 1's KL leaves it)
    kept = numpy_grpo_loss(logp, old_logp, gate_logit, old_gate_logit, batch,
                           dataclasses.replace(cfg, drop_zero_std_groups=False))
    assert abs(kept - expected) > 1e-6
  if not blended:  # and so does leaving out the blended tokens' policy-gradient terms
    every = numpy_grpo_loss(logp, old_logp, gate_logit, old_gate_logit, batch,
                            dataclasses.replace(cfg, score_blended_tokens=True))
    assert abs(every - expected) > 1e-6


@pytest.mark.parametrize('loss_agg', grpo.LOSS_AGGREGATIONS)
def test_dropping_zero_spread_groups_does_not_rescale_the_step(loss_agg):
  """drop_zero_std_groups takes the all-equal groups' terms out of the sum, not out of the normalisers (TRL divides
  by all sequences): with beta = 0 (their PPO term is 0 already) the loss and gradient are those without dropping,
  not scaled by N / kept; with beta > 0 the loss falls by exactly their KL terms over the full normaliser (N
  sequences for 'grpo', all loss tokens for 'dapo', N * T for 'dr_grpo')."""
  graphdef, params, _ = _policy_and_reference()
  host = make_batch()
  batch = jax.tree.map(jnp.asarray, host)
  advantages, zero_std = grpo.group_advantages(batch.rewards, G)
  np.testing.assert_array_equal(zero_std, [False, True, False, False])  # 4 of the 16 rows are dropped
  value_and_grad = jax.value_and_grad(grpo.grpo_loss, has_aux=True)
  logp, _ = _model_scores(graphdef, params, host)
  old_logp = logp + 0.3 * jax.random.normal(jax.random.key(5), logp.shape)  # ratios away from 1: a loss value
  unused = jnp.zeros(batch.completion.shape)  # old gate logits (the gate is not an action)

  def run(beta, drop):
    cfg = dataclasses.replace(CFG, loss_agg=loss_agg, beta=beta, drop_zero_std_groups=drop)
    (loss, _), grads = value_and_grad(params, graphdef, batch, advantages, grpo.loss_mask(batch, zero_std, cfg),
                                      old_logp, unused, False, cfg)
    return float(loss), grads

  kept, kept_grads = run(0.0, False)
  dropped, dropped_grads = run(0.0, True)
  assert abs(kept) > 1e-3
  np.testing.assert_allclose(dropped, kept, rtol=1e-6)
  _assert_trees_close(dropped_grads, kept_grads, atol=1e-7)

  d = np.asarray(host.ref_logprobs, np.float64) - np.asarray(logp, np.float64)
  kl = (np.exp(d) - d - 1) * ((host.completion_mask > 0) & (host.forced == 0))  # [N,T] over the loss tokens
  rows = np.repeat(np.asarray(zero_std), G)  # [N] dropped
  n_tokens = ((host.completion_mask > 0) & (host.forced == 0)).sum(1)  # [N]
  gap = {'grpo': (kl[rows].sum(1) / n_tokens[rows]).sum() / (B * G), 'dapo': kl[rows].sum() / n_tokens.sum(),
         'dr_grpo': kl[rows].sum() / (B * G * T)}[loss_agg] * CFG.beta
  assert gap > 1e-5
  np.testing.assert_allclose(run(CFG.beta, False)[0] - run(CFG.beta, True)[0], gap, rtol=1e-3)


def test_group_advantages_are_group_normalised_and_zero_spread_groups_give_zero():
  rewards = np.array([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3, -1.0, 2.0, 0.5, 0.5], np.float32)
  advantages, zero_std = grpo.group_advantages(jnp.asarray(rewards), 4)
  r = rewards.reshape(3, 4).astype(np.float64)
  expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
  expected[1] = 0.0
  np.testing.assert_array_equal(zero_std, [False, True, False])
  np.testing.assert_allclose(advantages, expected.reshape(-1), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(advantages)[4:8] == 0.0)  # exactly zero, not rounding noise / 1e-4


@pytest.mark.parametrize('scale', ['batch', 'none'])
def test_group_advantages_batch_and_no_scaling(scale):
  """'batch' divides the group-centred rewards by the std of all rewards, 'none' leaves them centred; a zero-spread
  group still gives exactly 0, and small spreads stay small (no group-wise blow-up)."""
  rewards = np.array([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3, -0.01, -0.02, -0.01, -0.03], np.float32)
  advantages, zero_std = grpo.group_advantages(jnp.asarray(rewards), 4, scale)
  r = rewards.reshape(3, 4).astype(np.float64)
  expected = r - r.mean(1, keepdims=True)
  if scale == 'batch':
    expected /= rewards.astype(np.float64).std(ddof=1) + 1e-4
  expected[1] = 0.0
  np.testing.assert_array_equal(zero_std, [False, True, False])
  np.testing.assert_allclose(advantages, expected.reshape(-1), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(advantages)[8:]).max() < 0.05  # the last group's 0.01 spreads are not scaled to ~1
  with pytest.raises(ValueError, match='grpo.scale_rewards'):
    grpo.GRPOConfig(scale_rewards='std')


def test_gate_as_action_without_gate_noise_is_rejected():
  """A noise-free gate sits at the mode of its binary-concrete density, so the gate term's gradient is exactly 0
  at the first iteration (gate_as_action is silently a no-op at mu = 1): GRPOConfig and the pipeline's config
  check reject the combination, and the shipped noise-free config (configs/addition_cot.py) does not set it."""
  gate_logit = jnp.linspace(-3.0, 3.0, 7)
  density_grad = lambda noise: jax.grad(lambda l: jnp.sum(grpo.gate_log_density(
      l, jax.lax.stop_gradient(l + noise) / TAU, TAU)))(gate_logit)
  assert float(jnp.abs(density_grad(0.0)).max()) < 1e-6
  assert float(jnp.abs(density_grad(1.0)).min()) > 0.1  # with noise the gate term has a gradient
  message = 'grpo.gate_as_action=True needs grpo.gate_noise=True'
  with pytest.raises(ValueError, match=message):
    grpo.GRPOConfig(gate_as_action=True, gate_noise=False)
  config = importlib.import_module('configs.addition_cot').get_config('grpo')
  assert not config.grpo.gate_noise and not config.grpo.gate_as_action
  pipeline.check_config(config)
  config.grpo.gate_as_action = True
  with pytest.raises(ValueError, match=message):
    pipeline.check_config(config)


# ------------------------------------------------------------------------------------ mu = 1: policy gradient


@pytest.mark.parametrize('loss_agg,gate_as_action,blended', [
    ('grpo', False, True), ('dapo', False, True), ('dr_grpo', False, True), ('grpo', True, True),
    ('grpo', False, False), ('grpo', True, False), ('dapo', True, False)])
def test_first_iteration_has_ratio_one_and_the_policy_gradient(loss_agg, gate_as_action, blended):
  """With mu=1 the ratio is exactly 1 and the gradient equals that of the policy-gradient form
  aggregate(-A * logp + beta * k3(logp, ref)) (logp including the gate's log-density when the gate is an action).
  With score_blended_tokens=False the token's log-prob leaves logp at blended inner positions but the gate's
  log-density stays: the gate keeps its credit exactly where it chose the latent (issue #20)."""
  cfg = dataclasses.replace(CFG, loss_agg=loss_agg, gate_as_action=gate_as_action, score_blended_tokens=blended)
  graphdef, params, ref_params = _policy_and_reference()
  host = make_batch(cfg)
  if not blended:
    host = _blended_positions(host)
  scored = blended or ~((host.inner_mask > 0) & (host.gates >= 0.5))
  batch = jax.tree.map(jnp.asarray, host)
  advantages, zero_std = grpo.group_advantages(batch.rewards, G)
  mask = grpo.loss_mask(batch, zero_std, cfg)
  junk = jnp.full(batch.completion.shape, 5.0)  # ignored on the first iteration

  def loss(p):
    return grpo.grpo_loss(p, graphdef, batch, advantages, mask, junk, junk, True, cfg)

  (_, (aux, _)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert float(aux['ratio']) == 1.0 and float(aux['clip_fraction']) == 0.0

  def policy_gradient_form(p):
    logp, gate_logit = _model_scores(graphdef, p, host)
    action = jnp.where(scored, logp, 0.0)
    if gate_as_action:
      z = jax.lax.stop_gradient(gate_logit + batch.gate_noise) / TAU
      x = TAU * z - gate_logit
      action = action + jax.scipy.stats.logistic.logpdf(x)
    d = batch.ref_logprobs - logp
    per_token = -advantages[:, None] * action + cfg.beta * (jnp.exp(d) - d - 1)
    return grpo.aggregate(per_token, mask, loss_agg)

  expected = jax.grad(policy_gradient_form)(params)
  _assert_trees_close(grads, expected, atol=1e-6, rtol=1e-4)
  gate_grad = np.abs(np.asarray(grads['gate_head']['kernel'])).max()
  assert gate_grad > 1e-6  # the gate head learns through the rebuilt blend


# ------------------------------------------------------------------------------------------- the jitted step


TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))  # no warmup: update 1 moves


@functools.lru_cache(maxsize=None)
def _step_fn(cfg: grpo.GRPOConfig, num_devices: int):
  graphdef, _, _ = _policy_and_reference()
  return grpo.make_grpo_step(graphdef, TX, cfg, parallel.make_mesh(num_devices))


def _init_state(mesh):
  _, params, _ = _policy_and_reference()
  return parallel.replicate(state_lib.init_state(params, TX, seed=0), mesh)


def _run_steps(num_devices: int, batches, cfg=CFG, steps: int = 2):
  mesh = parallel.make_mesh(num_devices)
  state = _init_state(mesh)
  for i in range(steps):
    batch = rollout.shard_rollout(batches[i % len(batches)], mesh, G)
    state, metrics = _step_fn(cfg, num_devices)(state, batch)
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.skipif(jax.device_count() < 4, reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=4')
def test_four_devices_equal_one():
  """The same rollouts on a 4-device mesh (one group per device) give the same params and metrics as on 1."""
  cfg = dataclasses.replace(CFG, mu=2, gate_as_action=True)
  batches = [make_batch(cfg, seed=s) for s in (0, 1)]
  s1, m1 = _run_steps(1, batches, cfg)
  s4, m4 = _run_steps(4, batches, cfg)
  assert int(s4.step) == 2 and int(s4.opt_state[1][0].count) == 4  # 2 rollouts x mu=2 updates
  _assert_trees_close(s1.params, s4.params, atol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m1[k], m4[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_mu_iterations_are_updates_against_the_first_iterations_logprobs():
  """mu=2 inside the step equals two hand-written optimizer steps: the second uses the first's log-probs and gate
  logits as old (so its ratio differs from 1)."""
  cfg = dataclasses.replace(CFG, mu=2, gate_as_action=True)
  graphdef, params, _ = _policy_and_reference()
  host = make_batch(cfg)
  s_step, metrics = _run_steps(1, [host], cfg, steps=1)

  batch = jax.tree.map(jnp.asarray, host)
  advantages, zero_std = grpo.group_advantages(batch.rewards, G)
  mask = grpo.loss_mask(batch, zero_std, cfg)
  grad_fn = jax.jit(jax.grad(grpo.grpo_loss, has_aux=True), static_argnums=(1, 8))
  p, opt = params, TX.init(params)
  zeros = jnp.zeros(batch.completion.shape)
  grads, (aux0, old) = grad_fn(p, graphdef, batch, advantages, mask, zeros, zeros, True, cfg)
  updates, opt = TX.update(grads, opt, p)
  p = optax.apply_updates(p, updates)
  grads, (aux1, _) = grad_fn(p, graphdef, batch, advantages, mask, old['logprobs'], old['gate_logits'], False, cfg)
  updates, opt = TX.update(grads, opt, p)
  p = optax.apply_updates(p, updates)
  _assert_trees_close(s_step.params, p, atol=1e-5)
  assert abs(float(aux1['ratio']) - 1.0) > 1e-5
  np.testing.assert_allclose(metrics['ratio'], (float(aux0['ratio']) + float(aux1['ratio'])) / 2, rtol=1e-5)


def test_reference_is_frozen():
  """The reference is a separate replicated argument of the rollout: after rollouts and updates it is unchanged
  (and not donated), while the policy moves; KL is 0 while policy == reference and grows once the policy moves."""
  mesh = parallel.make_mesh(1)
  _, params, _ = _policy_and_reference()
  ref_host = jax.tree.map(np.copy, params)
  ref_params = parallel.replicate(params, mesh)  # the Stage-1 weights, where the policy starts
  state = _init_state(mesh)
  kls = []
  for i in range(3):
    prompt, mask = rollout.repeat_prompts(*_prompts(seed=i), G)
    out, ref_logprobs = _rollout_fn(CFG, 1)(state.params, ref_params, prompt, mask, jax.random.key(i),
                                           jnp.float32(TAU))
    batch = _as_batch(out, ref_logprobs, prompt, mask, _rewards(i))
    state, metrics = _step_fn(CFG, 1)(state, rollout.shard_rollout(batch, mesh, G))
    kls.append(float(metrics['kl']))
  assert not any(x.is_deleted() for x in jax.tree.leaves(ref_params))
  _assert_trees_close(jax.device_get(ref_params), ref_host, atol=0.0)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                         jax.tree.leaves(ref_host)))
  assert moved > 1e-3
  assert kls[0] < 1e-6 and kls[-1] > 10 * max(kls[0], 1e-7), kls


def test_rescored_logprobs_of_a_fresh_rollout_equal_the_rollouts():
  """One engine for sampling and training: the first iteration's re-scored log-probs and gates of a fresh rollout
  (temperature 0.8, gate noise, latents on) match what generation recorded."""
  graphdef, params, ref_params = _policy_and_reference()
  host = make_batch()
  assert 0.05 < float(np.asarray(host.gates)[host.completion_mask > 0].mean()) < 0.95
  batch = jax.tree.map(jnp.asarray, host)
  logp, _ = _model_scores(graphdef, params, host)
  np.testing.assert_allclose(np.asarray(logp) * host.completion_mask, host.logprobs, atol=1e-4)
  _, metrics = _run_steps(1, [host], steps=1)
  assert metrics['logprob_mismatch_max'] < 1e-4 and metrics['gate_mismatch'] < 1e-5
  assert batch.rewards.shape == (B * G,)


# ------------------------------------------------------------------------------------------ rollout collector


def test_collector_keeps_groups_on_one_device_and_scores_rewards(hf_tokenizer):
  """collect(): N = B*G rows, each prompt's G completions contiguous and on one device; rewards are those of
  `reward.compute_rewards`; the 4-device rollout equals the 1-device one."""
  tokenizer = tokens.Tokenizer(hf_tokenizer, VOCAB)
  graphdef, params, ref_params = _policy_and_reference()
  prompt, mask = _prompts()
  refs = ['1', '2', '3', '4']
  results = {}
  for devices in sorted({1, min(4, jax.device_count())}):
    mesh = parallel.make_mesh(devices)
    collector = rollout.RolloutCollector(graphdef, CFG, tokenizer, 'addition', mesh)
    batch, info = collector.collect(parallel.replicate(params, mesh), parallel.replicate(ref_params, mesh), prompt,
                                    mask, refs, jax.random.key(3), TAU)
    for shard in batch.completion.addressable_shards:
      rows = shard.index[0]
      start, stop = rows.start or 0, rows.stop or B * G
      assert start % G == 0 and (stop - start) % G == 0, (devices, rows)
    results[devices] = jax.device_get(batch), info
  host, info = results[1]
  np.testing.assert_array_equal(host.prompt, np.repeat(prompt, G, axis=0))
  np.testing.assert_allclose(host.rewards, info['total'])
  assert len(info['completions']) == B * G and set(host.stats) == set(rollout.STATS)
  if len(results) > 1:
    other, _ = results[max(results)]
    np.testing.assert_array_equal(host.completion, other.completion)
    np.testing.assert_allclose(host.logprobs, other.logprobs, atol=1e-5)
    np.testing.assert_allclose(host.ref_logprobs, other.ref_logprobs, atol=1e-5)


def test_recurrent_rescore_is_exact_and_differentiates_through_the_fed_back_hidden_states():
  """grpo.rescore='recurrent' recomputes the rollout's log-probs with the teacher-forced unroll: the same numbers as
  generation, and a gradient that matches a finite difference of the loss in a random direction, which the
  parallel pass's gradient (no gradient through the stored hidden states) does not."""
  graphdef, params, _ = _policy_and_reference()
  batch = jax.tree.map(jnp.asarray, make_batch())
  advantages, zero_std = grpo.group_advantages(batch.rewards, G)
  mask = grpo.loss_mask(batch, zero_std, CFG)

  def loss_fn(rescore):
    cfg = dataclasses.replace(CFG, rescore=rescore)
    old_gate_logits = jnp.zeros_like(batch.logprobs)  # unused: the gate is not an action here
    # first=False: the ratio is taken against generation's log-probs, so the loss value moves with the parameters
    return jax.jit(lambda p: grpo.grpo_loss(p, graphdef, batch, advantages, mask, batch.logprobs, old_gate_logits,
                                            False, cfg))

  recurrent = loss_fn('recurrent')
  (value, (aux, _)), grads = jax.jit(jax.value_and_grad(recurrent, has_aux=True))(params)
  assert float(aux['logprob_mismatch_max']) < 1e-4
  parallel_value, parallel_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn('parallel')(p)[0]))(params)
  np.testing.assert_allclose(float(value), float(parallel_value), atol=1e-5)

  direction = jax.tree.map(lambda x, k: jax.random.normal(k, x.shape), params,
                           jax.tree.unflatten(jax.tree.structure(params),
                                              list(jax.random.split(jax.random.key(3), len(jax.tree.leaves(params))))))
  eps = 1e-4
  shifted = lambda s: float(recurrent(jax.tree.map(lambda x, d: x + s * eps * d, params, direction))[0])
  finite_difference = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
  along = lambda g: sum(float(jnp.vdot(a, d)) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
  np.testing.assert_allclose(along(grads), finite_difference, rtol=2e-2)
  assert abs(along(parallel_grads) - finite_difference) > 0.1 * abs(finite_difference)


def test_recurrent_rescore_takes_the_gate_logits_from_the_unroll():
  """With rescore='recurrent' the gate's log-density uses the unroll's hidden states h_{t-1}, the ones the token
  term uses: the loss (with the gate as an action and ratios away from 1) does not read the stored hidden states,
  and the gate logits handed to later iterations are the unroll's (equal to the stored ones' up to rounding, also
  when the stored hidden states are zeroed)."""
  cfg = dataclasses.replace(CFG, rescore='recurrent', gate_as_action=True)
  graphdef, params, _ = _policy_and_reference()
  batch = jax.tree.map(jnp.asarray, make_batch(cfg))
  advantages, zero_std = grpo.group_advantages(batch.rewards, G)
  mask = grpo.loss_mask(batch, zero_std, cfg)
  stored_gate_logits = nnx.merge(graphdef, params).gate_logit(batch.hidden_inputs)  # [N,T]
  old_gate_logits = stored_gate_logits + 0.5 * jax.random.normal(jax.random.key(4), stored_gate_logits.shape)
  loss = jax.jit(grpo.grpo_loss, static_argnums=(1, 8))
  run = lambda b: loss(params, graphdef, b, advantages, mask, batch.logprobs, old_gate_logits, False, cfg)
  value, (aux, _) = run(batch)
  zeroed_value, (_, new_old) = run(batch.replace(hidden_inputs=jnp.zeros_like(batch.hidden_inputs)))
  assert abs(float(aux['ratio']) - 1.0) > 1e-3  # the gate's density enters the loss
  np.testing.assert_allclose(float(zeroed_value), float(value), rtol=1e-6)
  np.testing.assert_allclose(new_old['gate_logits'], stored_gate_logits, atol=1e-5)
