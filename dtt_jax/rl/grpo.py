"""Stage 2, GRPO (SPEC §7): group-normalised advantages, PPO-clipped ratio, k3 KL to a frozen reference.

For a rollout of N = B*G completions (G per prompt, each group contiguous in the batch):

    A_i     = (r_i - mean_group(r)) / (std_group(r) + 1e-4)        (std with Bessel's correction, as TRL; A = 0 in a
                                                                    group whose rewards are all equal)
    ratio   = exp(logp_theta(y_t) - logp_old(y_t))                   (per completion token t)
    loss_t  = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) + beta * KL_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1             (k3 estimator, ref_t frozen, stored at rollout)

aggregated over the loss tokens by `loss_agg`:
    'grpo'    mean over each sequence's tokens, then mean over sequences
    'dapo'    sum over all tokens / number of tokens
    'dr_grpo' sum over all tokens / (number of sequences * max_new_tokens)

`drop_zero_std_groups` takes the groups whose rewards are all equal out of the sum (their PPO term is 0 already:
A = 0; what leaves is their KL term) but not out of the normalisers: 'grpo' still divides by all N sequences and
'dapo' by all loss tokens, as TRL's losses do (it keeps such groups, with A = 0). Dividing by the kept sequences
instead would scale the step by N / kept, a different learning rate for every batch.

`scale_rewards`, as TRL's option of that name: 'group' divides by the group's std as above (SPEC §7), 'batch' by the
std of all N rewards, 'none' not at all (Dr. GRPO). Group scaling blows a group's small reward differences up to unit
advantages: in a group with no correct answer, a few reasoning tokens or a gate mean decide the ranking.

Log-probabilities are re-scored in one parallel forward pass (`engine.rescore`): the inputs are rebuilt from the
stored hidden states (no gradient through them) and the stored gate noise with the current gate head, so the gate
head and projection get gradient through the blend. Token log-probs (`model/output_layer.py`, in vocabulary tiles
by default) are those of the temperature-scaled policy (logits / temperature, before top-k/p truncation), like the
rollout's. Loss tokens are the real completion tokens except those the reasoning budget forced (`<|eot|>` after
`max_think`): they were not sampled from the policy.

`score_blended_tokens=False`: a token sampled at a position whose gate is >= 0.5 is emitted but mostly not fed
back (the next input is g * h + (1 - g) * wte(token)). Inside the reasoning span the value of such a token changes
neither the later tokens nor the answer (unless it is a special token that ends the sequence or breaks the
structure), so its policy-gradient term has (nearly) zero expectation and only adds variance. The option drops the
token's log-prob from the action at inner positions with gate >= 0.5: without `gate_as_action` no PPO term is left
there; with it, the gate's log-density keeps its PPO term (it is exactly where the gate chose the latent). The KL
term stays, and <|bot|>, <|eot|> and the answer are outer positions.

`gate_as_action`: the gate sample is an action too. Its binary-concrete log-density (in logit space: the logit
z = (l_old + n) / tau of the stored sample, under the current gate logit l and tau; the Jacobian to the gate value
does not depend on the parameters and cancels in the ratio) is added to the token log-prob in the ratio. The KL
term stays over tokens only. The gate logit is taken from the same hidden states h_{t-1} as the token's logits: the
stored ones with `rescore='parallel'`, the unroll's with 'recurrent' (so its gradient flows through the recurrence
too). It needs `gate_noise`: a noise-free gate sits at the mode of its density (z = l_old / tau), where the gradient
of the log-density is exactly 0 at the first iteration and later ones only pull l back to l_old, so the config is
rejected (`check_config`).

`mu` inner iterations run inside the one jitted step (a `lax.scan`): each re-scores the same rollout with the
current parameters and takes one optimizer step. The "old" log-probs are those of the first iteration, whose
parameters are the rollout's: they are taken from its own forward pass (stop-gradient), so the first iteration's
ratio is exactly 1 and no extra forward pass is needed. The rollout's own log-probs are compared with them
(metric `logprob_mismatch`, SPEC §12). `state.step` counts rollouts (one per call); the optimizer counts updates
(`mu` per call): build its schedule with `steps * mu` (`make_grpo_optimizer`).

Memory (docs/scaling.md): each update's gradient sums `microbatches` passes over rows m, m + n, ... of the batch,
every pass normalised by the whole batch's counts (`normalisers`), so the update is the one of a single pass; only
the trained parameters are differentiated (`grads.grad`: a LoRA run's adapters, gate and train_modules); with the
trunk's `remat` on, each block gathers its FSDP-sharded weights itself, one layer at a time. A LoRA run's reference
keeps the trained leaves only (`reference_params`) and shares the frozen trunk with the policy.
"""

from __future__ import annotations

import dataclasses

import chex
import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dtt_jax import parallel
from dtt_jax.model import check_master_weights, output_layer
from dtt_jax.sampling import engine
from dtt_jax.train import grads as grads_lib, state as state_lib
from dtt_jax.train.state import TrainState

RESCORE_MODES = ('parallel', 'recurrent')
LOSS_AGGREGATIONS = ('grpo', 'dapo', 'dr_grpo')
REWARD_SCALINGS = ('group', 'batch', 'none')
STD_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Static settings of the rollout and the update (hashable). `from_config(config.grpo)` builds it."""

  num_generations: int = 8  # G completions per prompt
  beta: float = 0.04  # KL weight (0: no reference model needed)
  clip_eps: float = 0.2
  mu: int = 1  # inner iterations (optimizer steps) per rollout batch
  microbatches: int = 1  # gradient accumulation: each update sums this many passes over N / microbatches rows
  loss_agg: str = 'grpo'  # 'grpo' | 'dapo' | 'dr_grpo'
  scale_rewards: str = 'group'  # advantage divisor: the group's reward std | the batch's | none (module doc)
  # Take groups whose rewards are all equal out of the loss's sum, not its normalisers (module doc).
  drop_zero_std_groups: bool = False
  # False: the token leaves the action at inner positions whose gate is >= 0.5 (module doc); the gate's
  # log-density (gate_as_action) and the KL term keep them.
  score_blended_tokens: bool = True
  gate_as_action: bool = False  # needs gate_noise (module doc)
  # Sampling: shared by the rollout and the re-scoring, so both see the same policy.
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 32
  max_think: int = 16
  gate_noise: bool = True
  hard_gate: bool = False
  fused_logprobs: bool = True  # output layer + log-softmax in tiles (`output_layer.token_logprobs`): no [N,T,V] logits
  # How the update recomputes the rollout's log-probs: 'parallel' (SPEC §7: one forward pass, inputs rebuilt from
  # the stored hidden states, no gradient through them) or 'recurrent' (the teacher-forced unroll of the engine
  # with the stored noise: the same numbers, and the gradient also flows through the fed-back hidden states).
  rescore: str = 'parallel'

  def __post_init__(self):
    if self.loss_agg not in LOSS_AGGREGATIONS:
      raise ValueError(f'grpo.loss_agg={self.loss_agg!r}: expected one of {", ".join(LOSS_AGGREGATIONS)}.')
    if self.scale_rewards not in REWARD_SCALINGS:
      raise ValueError(f'grpo.scale_rewards={self.scale_rewards!r}: expected one of {", ".join(REWARD_SCALINGS)}.')
    if self.num_generations < 2:
      raise ValueError(f'grpo.num_generations={self.num_generations}: a group needs at least 2 completions.')
    if self.mu < 1:
      raise ValueError(f'grpo.mu={self.mu} must be >= 1.')
    if self.microbatches < 1:
      raise ValueError(f'grpo.microbatches={self.microbatches} must be >= 1.')
    if self.temperature <= 0:
      raise ValueError(f'grpo.temperature={self.temperature} must be > 0 (GRPO samples; greedy is for evaluation).')
    if self.rescore not in RESCORE_MODES:
      raise ValueError(f'grpo.rescore={self.rescore!r}: expected one of {", ".join(RESCORE_MODES)}.')
    if self.gate_as_action and not self.gate_noise:
      raise ValueError('grpo.gate_as_action=True needs grpo.gate_noise=True: a noise-free gate is the mode of its '
                       'binary-concrete density, so the gate term has exactly zero gradient at the first iteration '
                       '(mu = 1: the option does nothing) and later iterations only pull the gate logit back to the '
                       "rollout's. Set grpo.gate_noise=True or grpo.gate_as_action=False.")

  @classmethod
  def from_config(cls, g) -> GRPOConfig:
    """From `config.grpo`; keys added after a run was configured keep their defaults."""
    return cls(**{f.name: g[f.name] for f in dataclasses.fields(cls) if f.name in g})


@flax.struct.dataclass
class RolloutBatch:
  """One GRPO batch of N = B*G completions (groups contiguous), made by `rollout.RolloutCollector`. Every field has
  the leading axis N."""

  prompt: jax.Array  # [N,P] int32, left-padded
  prompt_mask: jax.Array  # [N,P] int32
  completion: jax.Array  # [N,T] int32 model ids (eos after the end)
  completion_mask: jax.Array  # [N,T] int32: real tokens through the first eos inclusive
  forced: jax.Array  # [N,T] int32: <|eot|> forced by the reasoning budget (not sampled: no loss)
  logprobs: jax.Array  # [N,T] float32 rollout log-probs under logits / temperature, untruncated (0 at padding)
  ref_logprobs: jax.Array  # [N,T] float32 reference log-probs (0 when beta == 0)
  gates: jax.Array  # [N,T] float32 gate that blended each position's input
  gate_noise: jax.Array  # [N,T] float32 logistic noise of each gate
  hidden_inputs: jax.Array  # [N,T,D] h_{t-1}, blended into position t's input
  inner_mask: jax.Array  # [N,T] float32: positions strictly inside <|bot|> ... <|eot|>
  outer_mask: jax.Array  # [N,T] float32: other real positions
  tau: jax.Array  # [N] float32 gate temperature of the rollout (the update re-scores with it)
  rewards: jax.Array  # [N] float32 total reward
  stats: dict[str, jax.Array]  # name -> [N] float32 (`rollout.STATS`)


def check_config(g) -> None:
  """Raises ValueError, naming the key, on bad values in `config.grpo` (those `GRPOConfig` checks)."""
  GRPOConfig.from_config(g)


def make_grpo_optimizer(g, train_modules: tuple[str, ...]) -> optax.GradientTransformation:
  """AdamW + clipping from `config.grpo`; the schedule counts optimizer updates (steps * mu). `train_modules`
  (`config.lora.train_modules`) train besides LoRA adapters and gate when the params hold adapters."""
  return state_lib.make_optimizer(g.lr, g.steps * g.mu, g.warmup_steps * g.mu, g.weight_decay, g.grad_clip,
                                  g.gate_lr_mult, train_modules=train_modules)


# ------------------------------------------------------------------------------------------------- advantages


def group_advantages(rewards: jax.Array, num_generations: int,
                     scale: str = 'group') -> tuple[jax.Array, jax.Array]:
  """rewards [N] (N = B*G, groups contiguous) -> (advantages [N], zero_std [B] bool).

  A = (r - mean_group) / (std + 1e-4), std that of the group, of all N rewards or 1 (no division) by `scale`
  ('group' | 'batch' | 'none'); exactly 0 in a group whose rewards are all equal (`zero_std`).
  """
  grouped = rewards.astype(jnp.float32).reshape(-1, num_generations)  # [B,G]
  mean = grouped.mean(axis=1, keepdims=True)
  zero_std = grouped.max(axis=1) == grouped.min(axis=1)  # [B]
  if scale == 'group':
    divisor = jnp.std(grouped, axis=1, keepdims=True, ddof=1) + STD_EPS
  elif scale == 'batch':
    divisor = jnp.std(grouped, ddof=1) + STD_EPS
  elif scale == 'none':
    divisor = 1.0
  else:
    raise ValueError(f'Unknown reward scaling {scale!r}; expected one of {", ".join(REWARD_SCALINGS)}.')
  advantages = jnp.where(zero_std[:, None], 0.0, (grouped - mean) / divisor)
  return advantages.reshape(-1), zero_std


# ------------------------------------------------------------------------------------------ per-token quantities


def gate_log_density(gate_logit: jax.Array, sample_logit: jax.Array, tau) -> jax.Array:
  """Binary-concrete log-density, in logit space, of the stored gate sample under the current gate logit.

  gate_logit [N,T] (current l), sample_logit [N,T] (z = (l_old + n) / tau of the stored sample), tau broadcastable.
  z = (l + n') / tau with logistic n', so log p(z) = log tau + log f(tau * z - l), log f(x) = -x - 2 softplus(-x).
  """
  x = tau * sample_logit - gate_logit
  return jnp.log(tau) - x - 2.0 * jax.nn.softplus(-x)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """exp(ref - logp) - (ref - logp) - 1 >= 0, per token."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def normalisers(norm_mask: jax.Array, mask: jax.Array | None = None, real: jax.Array | None = None):
  """The denominators of `aggregate` and of the metrics' means over a batch, each at least 1: 'sequences' (rows with
  a token of norm_mask [N,T]), 'tokens' (its tokens), 'cells' (N * T), 'loss_tokens' (of `mask`) and 'real' (of
  `real`, the completion mask). A microbatch of the batch divides by the whole batch's (`make_grpo_step`)."""
  f32 = lambda x: x.astype(jnp.float32)
  norm = f32(norm_mask)
  out = {'sequences': jnp.maximum(jnp.sum(norm.sum(-1) > 0), 1).astype(jnp.float32),
         'tokens': jnp.maximum(norm.sum(), 1.0), 'cells': jnp.float32(norm.shape[0] * norm.shape[1])}
  for name, m in (('loss_tokens', mask), ('real', real)):
    if m is not None:
      out[name] = jnp.maximum(f32(m).sum(), 1.0)
  return out


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, norm_mask: jax.Array | None = None,
              counts: dict[str, jax.Array] | None = None) -> jax.Array:
  """per_token, mask [N,T] -> scalar by `mode` ('grpo' | 'dapo' | 'dr_grpo'; module doc).

  norm_mask [N,T] (default `mask`), a superset of `mask`: the tokens and sequences the normalisers count. Terms
  outside `mask` leave the sum only (dropped groups: the step is not rescaled). `counts`: `normalisers` of the
  whole batch when this is a microbatch of it (default: of this one).
  """
  mask = mask.astype(per_token.dtype)
  norm = mask if norm_mask is None else norm_mask.astype(per_token.dtype)
  counts = normalisers(norm) if counts is None else counts
  total = per_token * mask
  if mode == 'grpo':
    per_seq = total.sum(-1) / jnp.maximum(norm.sum(-1), 1.0)  # [N]
    return jnp.sum(per_seq) / counts['sequences']  # a row without tokens has per_seq 0
  if mode == 'dapo':
    return total.sum() / counts['tokens']
  if mode == 'dr_grpo':
    return total.sum() / counts['cells']
  raise ValueError(f'Unknown loss aggregation {mode!r}; expected one of {", ".join(LOSS_AGGREGATIONS)}.')


def _masked_mean(x: jax.Array, mask: jax.Array, count=None) -> jax.Array:
  """sum(x * mask) / count (default: mask's sum, at least 1)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / (jnp.maximum(jnp.sum(mask), 1.0) if count is None else count)


# -------------------------------------------------------------------------------------------------------- loss


def sampled_mask(batch: RolloutBatch) -> jax.Array:
  """[N,T] bool: real completion tokens not forced by the budget (the loss normalisers count these)."""
  return (batch.completion_mask > 0) & (batch.forced == 0)


def loss_mask(batch: RolloutBatch, zero_std: jax.Array, cfg: GRPOConfig) -> jax.Array:
  """[N,T] float: real completion tokens, not forced by the budget, not in a dropped zero-std group."""
  mask = sampled_mask(batch)
  if cfg.drop_zero_std_groups:
    keep_rows = ~jnp.repeat(zero_std, cfg.num_generations)  # [N]
    mask = mask & keep_rows[:, None]
  return mask.astype(jnp.float32)


def grpo_loss(params, graphdef, batch: RolloutBatch, advantages: jax.Array, mask: jax.Array,
              old_logprobs: jax.Array, old_gate_logits: jax.Array, first, cfg: GRPOConfig, counts=None):
  """The GRPO objective of one rollout batch -> (loss, aux).

  advantages [N]; mask [N,T] loss tokens (`loss_mask`; the normalisers count all of `sampled_mask`);
  old_logprobs, old_gate_logits [N,T]: the first iteration's (ignored when `first` is true: then this pass's own
  values, stop-gradient, are the old ones and the ratio is 1). `counts`: `normalisers` of the whole batch when
  `batch` is a microbatch of it (then the loss and the metrics but the max are sums over microbatches).
  aux: scalar metrics, and `logprobs`, `gate_logits` [N,T] of this pass (stop-gradient) for later iterations.
  """
  n, t = batch.completion.shape
  chex.assert_shape([advantages], (n,))
  chex.assert_shape([mask, old_logprobs, old_gate_logits, batch.ref_logprobs, batch.gate_noise], (n, t))
  if counts is None:
    counts = normalisers(sampled_mask(batch), mask, batch.completion_mask)
  model = nnx.merge(graphdef, params)
  tau = batch.tau[:, None]  # [N,1]: the temperature each row was generated with
  hidden_inputs = jax.lax.stop_gradient(batch.hidden_inputs)
  if cfg.rescore == 'recurrent':
    out = engine.unroll(model, batch.prompt, batch.prompt_mask, batch.completion, batch.gate_noise, batch.tau,
                        hard=cfg.hard_gate)
    target_hidden, gates = out.target_hidden, out.gates
    gate_hidden = target_hidden  # h_{t-1} of the unroll: the gate and the token see the same hidden states
  else:
    target_hidden, gates = engine.rescore(model, batch.prompt, batch.prompt_mask, batch.completion, hidden_inputs,
                                          batch.gate_noise, tau, hard=cfg.hard_gate)
    gate_hidden = hidden_inputs  # the stored h_{t-1}, as the rebuilt inputs
  logp, entropy = output_layer.token_logprobs(model.gpt2, target_hidden, batch.completion, cfg.temperature,
                                              cfg.fused_logprobs)
  gate_logits = model.gate_logit(gate_hidden)  # [N,T]
  old_logp = jnp.where(first, jax.lax.stop_gradient(logp), old_logprobs)
  old_gl = jnp.where(first, jax.lax.stop_gradient(gate_logits), old_gate_logits)

  # The action's log-prob [N,T]: the token's, except at blended inner positions when they are not scored (module
  # doc), plus the gate's log-density when the gate is an action.
  scored = jnp.ones(logp.shape, bool)
  if not cfg.score_blended_tokens:
    scored = ~((batch.inner_mask > 0) & (batch.gates >= 0.5))
  action_logp, old_action_logp = jnp.where(scored, logp, 0.0), jnp.where(scored, old_logp, 0.0)
  if cfg.gate_as_action:
    sample_logit = (old_gl + batch.gate_noise) / tau
    action_logp = action_logp + gate_log_density(gate_logits, sample_logit, tau)
    old_action_logp = old_action_logp + gate_log_density(old_gl, sample_logit, tau)
  ratio = jnp.exp(action_logp - old_action_logp)
  adv = advantages[:, None]
  clipped_ratio = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
  per_token = -jnp.minimum(ratio * adv, clipped_ratio * adv)
  if not cfg.gate_as_action:
    per_token = jnp.where(scored, per_token, 0.0)  # no action left to score
  kl = k3_kl(logp, batch.ref_logprobs)
  if cfg.beta:
    per_token = per_token + cfg.beta * kl
  loss = aggregate(per_token, mask, cfg.loss_agg, sampled_mask(batch), counts)

  real, n_real, n_loss = batch.completion_mask, counts['real'], counts['loss_tokens']
  clipped = ((ratio < 1.0 - cfg.clip_eps) & (adv < 0)) | ((ratio > 1.0 + cfg.clip_eps) & (adv > 0))
  aux = {
      'loss': loss,
      'kl': _masked_mean(kl, real, n_real),
      'entropy': _masked_mean(entropy, real, n_real),
      'clip_fraction': _masked_mean(clipped, mask, n_loss),
      'ratio': _masked_mean(ratio, mask, n_loss),
      'logprob_mismatch': _masked_mean(jnp.abs(batch.logprobs - logp), real, n_real),
      'logprob_mismatch_max': jnp.max(jnp.abs(batch.logprobs - logp) * real),
      'gate_mismatch': _masked_mean(jnp.abs(batch.gates - gates), real, n_real),
  }
  return loss, (aux, {'logprobs': jax.lax.stop_gradient(logp), 'gate_logits': jax.lax.stop_gradient(gate_logits)})


def batch_metrics(batch: RolloutBatch, advantages: jax.Array, zero_std: jax.Array) -> dict[str, jax.Array]:
  """Rollout statistics: rewards and their components, accuracy, structure, lengths, gates, group spread."""
  real = batch.completion_mask.astype(jnp.float32)
  metrics = {name: jnp.mean(value.astype(jnp.float32)) for name, value in batch.stats.items()}
  metrics.update(
      reward=jnp.mean(batch.rewards),
      reward_std=jnp.mean(jnp.std(batch.rewards.reshape(zero_std.shape[0], -1), axis=1, ddof=1)),
      advantage_abs=jnp.mean(jnp.abs(advantages)),
      zero_std_fraction=jnp.mean(zero_std.astype(jnp.float32)),
      completion_length=jnp.sum(real) / real.shape[0],
      reasoning_length=jnp.sum(batch.inner_mask) / real.shape[0],
      forced_fraction=jnp.mean(jnp.sum(batch.forced, axis=1) > 0),
      gate_inner=_masked_mean(batch.gates, batch.inner_mask),
      gate_outer=_masked_mean(batch.gates, batch.outer_mask),
  )
  return metrics


def reference_params(start, trained=None):
  """What a run keeps of the frozen reference (beta > 0): the trained leaves of the start params (`trained`: a
  `grads.trained_filter`; None: all), None at the frozen ones, which the policy shares (LoRA's base never changes):
  a LoRA run stores its trunk once."""
  return grads_lib.split_trained(start, trained)[0]


def reference_model_params(reference, params):
  """The reference's whole params: its own leaves (`reference_params`), the policy's `params` at its None leaves."""
  return grads_lib.combine(reference, params)


def make_grpo_step(graphdef, tx: optax.GradientTransformation, cfg: GRPOConfig, mesh, trained=None):
  """-> jitted `grpo_step(state, batch: RolloutBatch) -> (state, metrics)`.

  The state is donated and laid out by `parallel.state_shardings`; the batch is sharded over ('data', 'fsdp') by
  whole groups (`rollout.collect`).
  `cfg.mu` optimizer steps on the same batch inside the call; metrics average them (except `logprob_mismatch*`, of
  the first iteration, whose parameters generated the rollout). Each step's gradient sums `cfg.microbatches` passes
  over rows m, m + n, ... (`grads.accumulate`), each normalised by the whole batch's counts: the same update as one
  pass. Only `trained` parameters are differentiated (`grads.grad`); with the trunk's `remat` on, its blocks gather
  their weights one layer at a time (`model/blocks.py`), else the whole model is gathered first.
  """
  n_micro = cfg.microbatches

  def grpo_step(state: TrainState, batch: RolloutBatch):
    check_master_weights(state.params)  # at trace time: float32 master weights (config.model.param_dtype)
    n, t = batch.completion.shape
    if n % (parallel.num_shards(mesh) * n_micro):
      raise ValueError(f'grpo.microbatches={n_micro}: the {n // parallel.num_shards(mesh)} completions per device '
                       f'(prompts_per_step x num_generations / {parallel.num_shards(mesh)} devices) must be divisible '
                       'by it.')
    advantages, zero_std = group_advantages(batch.rewards, cfg.num_generations, cfg.scale_rewards)
    mask = loss_mask(batch, zero_std, cfg)
    counts = normalisers(sampled_mask(batch), mask, batch.completion_mask)  # of the whole batch
    # per-layer gathers for the one parallel pass (a recurrent re-score runs the blocks once per position)
    per_layer = nnx.merge(graphdef, state.params).gpt2.cfg.remat != 'none' and cfg.rescore == 'parallel'
    micro = grads_lib.split_microbatches((batch, advantages, mask), n_micro)

    def iteration(carry, i):
      params, opt_state, old = carry

      def one(xs, m):
        del m
        (b, adv, msk), o = xs
        loss = lambda p: grpo_loss(p, graphdef, b, adv, msk, o['logprobs'], o['gate_logits'], i == 0, cfg, counts)
        grads, (aux, new_old) = grads_lib.grad(loss, params, mesh, trained, per_layer)
        worst = aux.pop('logprob_mismatch_max')
        return (grads, aux), (new_old, worst)

      (grads, aux), (new_old, worst) = grads_lib.accumulate(
          one, (micro, grads_lib.split_microbatches(old, n_micro)), n_micro, mesh)
      grads = grads_lib.fill_frozen(grads, params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = grads_lib.apply_updates(params, updates, trained)
      new_old = grads_lib.merge_microbatches(new_old)
      old = jax.tree.map(lambda new, prev: jnp.where(i == 0, new, prev), new_old, old)
      return (params, opt_state, old), dict(aux, logprob_mismatch_max=jnp.max(worst),
                                            grad_norm=optax.global_norm(grads))

    zeros = jnp.zeros((n, t), jnp.float32)
    old = {'logprobs': zeros, 'gate_logits': zeros}
    (params, opt_state, _), per_iter = jax.lax.scan(iteration, (state.params, state.opt_state, old),
                                                    jnp.arange(cfg.mu))
    metrics = {k: (v[0] if k.startswith('logprob_mismatch') else jnp.mean(v)) for k, v in per_iter.items()}
    metrics.update(batch_metrics(batch, advantages, zero_std))
    metrics['tau'] = jnp.mean(batch.tau)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return parallel.jit_sharded(grpo_step, mesh, (parallel.STATE, sharded), (parallel.STATE, replicated),
                              donate_argnums=0)
