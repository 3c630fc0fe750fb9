"""The losses and train steps of the two stages.

* teacher: next-token cross-entropy on whole texts (`make_lm_step`).
* think: GRPO on the thinking policy (`make_think_step`): G rollouts per prefix (`decode.generate`), rewards
  ('teacher': the frozen teacher's mean log-likelihood of the rollout's real tokens, thinking removed,
  `teacher_reward`; 'next_token': the policy's log-likelihood of the data's next token after the thoughts),
  group-normalised advantages, then `mu` updates of rl/grpo.py's clipped objective with k3 KL (`think_loss`), the
  actions re-scored in one parallel pass (`rollout_logits`).

Both steps are jitted with the batch sharded over the mesh and the state, the reference and the teacher laid out
by `parallel`'s rule table (`config.parallel.fsdp`; 1: replicated); the state is donated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dtt_jax import parallel
from dtt_jax.methods.think_tokens.data import PrefixBatch
from dtt_jax.methods.think_tokens.decode import Rollout, generate
from dtt_jax.methods.think_tokens.policy import (ROWS, ThinkConfig, action_logprobs, forward, lm_logprobs,
                                                 real_logprobs)
from dtt_jax.model import check_master_weights, output_layer
from dtt_jax.model.gpt2 import GPT2
from dtt_jax.rl import grpo
from dtt_jax.train import state as state_lib

# ------------------------------------------------------------------------------------------------- teacher stage


def make_lm_step(graphdef, tx: optax.GradientTransformation, mesh):
  """-> jitted `step(state, {'tokens', 'mask'} [B,L]) -> (state, {'loss', 'grad_norm'})`: next-token CE."""

  def loss_fn(params, batch):
    lp = lm_logprobs(nnx.merge(graphdef, params), batch['tokens'], batch['mask'])
    return -jnp.sum(lp) / jnp.maximum(jnp.sum(batch['mask'][:, 1:]), 1)

  def lm_step(state, batch):
    check_master_weights(state.params)  # at trace time: float32 master weights (config.model.param_dtype)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), {'loss': loss, 'grad_norm': optax.global_norm(grads)})

  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return parallel.jit_sharded(lm_step, mesh, (parallel.STATE, sharded), (parallel.STATE, replicated),
                              donate_argnums=0)


# --------------------------------------------------------------------------------------------------- think stage


def rollout_logits(model: GPT2, prefix, prefix_mask, actions) -> jax.Array:
  """One parallel pass over prefix [B,P] + actions [B,N] -> the logits [B,N,V+K] that chose each action."""
  p, n = prefix.shape[1], actions.shape[1]
  ids = jnp.concatenate([prefix, actions], axis=1)
  mask = jnp.concatenate([prefix_mask, jnp.ones_like(actions)], axis=1)
  return model.logits(forward(model, ids, mask)[:, p - 1:p + n - 1])


def teacher_reward(teacher: GPT2, prefix, prefix_mask, actions, action_mask) -> jax.Array:
  """The frozen teacher's mean log-likelihood of the rollout's real tokens given the prefix, thinking tokens
  removed first: prefix, prefix_mask [B,P], actions, action_mask [B,N] -> [B] (0 for a rollout without real
  tokens). The real tokens are moved to the front (order kept) and scored right after the left-padded prefix."""
  vr, p, n = teacher.cfg.vocab_rows, prefix.shape[1], actions.shape[1]
  real = (action_mask > 0) & (actions < vr)  # [B,N]
  order = jnp.argsort(~real, axis=1, stable=True)
  kept_mask = jnp.take_along_axis(real, order, 1)
  kept = jnp.where(kept_mask, jnp.take_along_axis(actions, order, 1), 0)  # [B,N] real tokens first
  ids = jnp.concatenate([prefix, kept], axis=1)
  mask = jnp.concatenate([prefix_mask, kept_mask.astype(prefix_mask.dtype)], axis=1)
  hidden = forward(teacher, ids, mask)[:, p - 1:p + n - 1]  # [B,N,D]
  lp, _ = output_layer.token_logprobs(teacher, hidden, kept, fused=False)  # [B,N] over the real columns
  count = jnp.sum(kept_mask, axis=1)
  return jnp.sum(jnp.where(kept_mask, lp, 0.0), axis=1) / jnp.maximum(count, 1)


def think_loss(params, graphdef, roll: Rollout, prefix, prefix_mask, advantages, ref_logprobs, old_logprobs, first,
               cfg: ThinkConfig):
  """GRPO objective of one rollout batch (rl/grpo.py's clip, k3 KL and aggregation) -> (loss, (aux, logprobs)).

  roll [N,T]; advantages [N]; ref_logprobs, old_logprobs [N,T] (old ignored when `first`: this pass's own values,
  stop-gradient, so the first iteration's ratio is 1). next_token mode adds ce_weight * CE of the data token at each
  rollout's final (real) action."""
  model = nnx.merge(graphdef, params)
  vr = model.cfg.vocab_rows
  next_token = cfg.mode == 'next_token'
  logits = rollout_logits(model, prefix, prefix_mask, roll.tokens)  # [N,T,V+K]
  logp = action_logprobs(logits, roll.tokens, roll.allowed > 0, vr, cfg.temperature, next_token)
  old = jnp.where(first, jax.lax.stop_gradient(logp), old_logprobs)
  ratio = jnp.exp(logp - old)
  adv = advantages[:, None]
  per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv)
  kl = grpo.k3_kl(logp, ref_logprobs)
  if cfg.beta:
    per_token = per_token + cfg.beta * kl
  mask = roll.mask.astype(jnp.float32)
  loss = grpo.aggregate(per_token, mask, cfg.loss_agg)
  mean = lambda x, m=mask: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
  clipped = ((ratio < 1.0 - cfg.clip_eps) & (adv < 0)) | ((ratio > 1.0 + cfg.clip_eps) & (adv > 0))
  aux = {'pg_loss': loss, 'kl': mean(kl), 'ratio': mean(ratio), 'clip_fraction': mean(clipped),
         'logprob_mismatch': mean(jnp.abs(roll.logprobs - logp))}
  if next_token:
    final = mask * (roll.tokens < vr)  # [N,T] the real action ending each rollout (the data token)
    data_token = jnp.where(roll.tokens < vr, roll.tokens, 0)  # thinking ids are out of range: masked anyway
    ce = -mean(real_logprobs(logits, data_token, vr), final)
    aux['ce'] = ce
    if cfg.ce_weight:
      loss = loss + cfg.ce_weight * ce
  aux['loss'] = loss
  return loss, (aux, jax.lax.stop_gradient(logp))


def make_think_step(graphdef, teacher_graphdef, tx: optax.GradientTransformation, cfg: ThinkConfig, eos_id: int,
                    mesh):
  """-> jitted `step(state, reference_params, teacher_params, batch: PrefixBatch) -> (state, metrics)`: G rollouts
  per prefix, rewards, advantages, then `mu` optimizer updates. The state is donated."""

  def think_step(state, reference, teacher, batch: PrefixBatch):
    check_master_weights(state.params)
    g = cfg.num_generations
    prefix, prefix_mask, target = (jnp.repeat(x, g, axis=0) for x in (batch.prefix, batch.prefix_mask, batch.target))
    policy = nnx.merge(graphdef, state.params)
    vr = policy.cfg.vocab_rows
    roll = generate(policy, prefix, prefix_mask, state_lib.step_key(state, salt=3), cfg, eos_id, target)
    if cfg.mode == 'teacher':
      rewards = teacher_reward(nnx.merge(teacher_graphdef, teacher), prefix, prefix_mask, roll.tokens, roll.mask)
    else:
      rewards = roll.target_logprob
    advantages, zero_std = grpo.group_advantages(rewards, g)
    ref_logp = jnp.zeros(roll.tokens.shape, jnp.float32)
    if cfg.beta:
      ref_logits = rollout_logits(nnx.merge(graphdef, reference), prefix, prefix_mask, roll.tokens)
      ref_logp = action_logprobs(ref_logits, roll.tokens, roll.allowed > 0, vr, cfg.temperature,
                                 cfg.mode == 'next_token')
    grad_fn = jax.grad(think_loss, has_aux=True)

    def iteration(carry, i):
      params, opt_state, old = carry
      grads, (aux, logp) = grad_fn(params, graphdef, roll, prefix, prefix_mask, advantages, ref_logp, old, i == 0,
                                   cfg)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state, jnp.where(i == 0, logp, old)), dict(aux, grad_norm=optax.global_norm(grads))

    (params, opt_state, _), per_iter = jax.lax.scan(
        iteration, (state.params, state.opt_state, jnp.zeros(roll.tokens.shape, jnp.float32)), jnp.arange(cfg.mu))
    metrics = {k: (v[0] if k == 'logprob_mismatch' else jnp.mean(v)) for k, v in per_iter.items()}
    mask = roll.mask.astype(jnp.float32)
    thinking = mask * (roll.tokens >= vr)
    metrics.update(reward=jnp.mean(rewards),
                   reward_std=jnp.mean(jnp.std(rewards.reshape(-1, g), axis=1, ddof=1)),
                   zero_std_fraction=jnp.mean(zero_std.astype(jnp.float32)),
                   think_fraction=jnp.sum(thinking) / jnp.maximum(jnp.sum(mask), 1.0),
                   rollout_length=jnp.sum(mask) / mask.shape[0],
                   think_bias=jnp.mean(params['think_bias']))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  state = parallel.STATE
  return parallel.jit_sharded(think_step, mesh, (state, state, state, sharded), (state, replicated),
                              donate_argnums=0)


def think_optimizer(t) -> optax.GradientTransformation:
  """From `config.think`: global-norm clipping, then AdamW (warmup + cosine over steps * mu updates); the thinking
  rows at lr * rows_lr_mult; with train='rows' every other parameter gets a zero update and no moments."""
  steps, warmup = t.steps * t.mu, t.warmup_steps * t.mu

  def adamw(peak):
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(steps, warmup + 1),
                                                  end_value=peak * 0.1)
    return optax.adamw(schedule, weight_decay=t.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))

  def labels(params):
    other = 'trunk' if t.train == 'all' else 'frozen'
    return {k: jax.tree.map(lambda _, k=k: 'rows' if k in ROWS else other, v) for k, v in params.items()}

  frozen = lambda params: jax.tree.map(lambda label: label == 'frozen', labels(params))
  transforms = {'rows': adamw(t.lr * t.rows_lr_mult), 'trunk': adamw(t.lr), 'frozen': optax.set_to_zero()}
  return optax.chain(optax.masked(optax.set_to_zero(), frozen), optax.clip_by_global_norm(t.grad_clip),
                     optax.multi_transform(transforms, labels))
