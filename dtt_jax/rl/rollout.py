"""GRPO rollouts: B prompts x G completions from the generation engine with the policy's params, scored by the reward.

Each prompt is repeated G times contiguously (row i of the N = B*G rows belongs to prompt i // G), and the N axis
is sharded over the ('data', 'fsdp') mesh with B divisible by the number of batch shards, so every device holds
whole groups and group statistics never cross devices. The rollout stores everything the update needs to re-score
it in one parallel pass: tokens, the rollout's log-probs, gates, gate noise, the hidden states used as inputs, the
temperature it was generated with, and (beta > 0) the frozen reference model's log-probs of the same completions,
re-scored from the same stored hidden states and noise with the reference's own gate head.

Stored log-probs are those of the untruncated policy (softmax(logits / temperature), `sampler.sample`), which the
update's re-scoring reproduces. With `top_k` or `top_p` on, tokens are drawn from the truncated distribution, whose
log-probs are larger by -log(kept mass): the PPO ratio is then a ratio of untruncated policies, not the one against
the behaviour policy (at mu > 1 they differ by the ratio of the kept masses), and the gradient is that of the
untruncated log-prob.

`collect` takes the global batch of prompts (the same on every process); rewards are computed on the host from
the decoded completions (`dtt_jax.reward`: `answer_match` scores the answer, `length_reward` 'flat' or 'group'
the efficiency term), and the large arrays (hidden states) never leave the devices. With `min_think` > 0 every
completion gets its own reasoning budget, drawn uniformly from [min_think, max_think] (forced `<|eot|>` after it),
so the completions of one group differ in length (L1's budgets drawn per rollout). The batch
type, `RolloutBatch`, is defined by its consumer, `grpo.py` (this module imports grpo, never the reverse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtt_jax import parallel, reward
from dtt_jax.model import output_layer
from dtt_jax.rl.grpo import GRPOConfig, RolloutBatch, reference_model_params
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.tokens import Tokenizer, Vocab

# Per-completion statistics carried to the step's metrics: metric name -> field of `reward.compute_rewards`.
STATS = {
    'reward_structure': 'structure', 'reward_correctness': 'correctness', 'reward_efficiency': 'efficiency',
    'reward_gate': 'gate', 'accuracy': 'correct', 'structure_rate': 'structure_ok',
}


def generate_config(cfg: GRPOConfig, vocab: Vocab) -> engine.GenerateConfig:
  """The engine settings of a GRPO rollout: sampled tokens, gate noise on (`cfg.gate_noise`), hidden states kept."""
  return engine.GenerateConfig(
      max_new_tokens=cfg.max_new_tokens, eos_id=vocab.eos, bot_id=vocab.bot, eot_id=vocab.eot,
      sampling=SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p),
      max_think=cfg.max_think, gate_noise=cfg.gate_noise, hard_gate=cfg.hard_gate, early_stop=True,
      return_hidden=True)


def repeat_prompts(prompt: np.ndarray, prompt_mask: np.ndarray, num_generations: int):
  """[B,P] -> [B*G,P]: each prompt G times in a row (a group is contiguous)."""
  return np.repeat(prompt, num_generations, axis=0), np.repeat(prompt_mask, num_generations, axis=0)


def make_rollout_fn(graphdef, cfg: GRPOConfig, vocab: Vocab, mesh, min_think: int = 0, pinned_id: int = -1,
                    forced_prefix: tuple[int, ...] = (), pin_others: bool = False):
  """-> jitted `rollout(params, ref_params, prompt, prompt_mask, key, tau) -> (engine.Rollout, ref_logprobs [N,T])`.

  prompt, prompt_mask [N,P] sharded over ('data', 'fsdp'); params, ref_params (None when beta == 0; None at its
  leaves the policy shares, `grpo.reference_params`) laid out by `parallel.state_shardings` (gathered inside); key,
  tau replicated. The reference parameters are only read.
  min_think > 0: a budget per row, uniform in [min_think, cfg.max_think] (module docstring). pinned_id >= 0: that
  token's gate is 1 (`model.dtt.pin_noise`, stored in the rollout's noise, so the update re-scores it alike), with
  `pin_others` every other token's 0.
  forced_prefix: tokens forced first (the compressing DTT's latent head; marked `forced`: no loss).
  """
  gen_cfg = dataclasses.replace(generate_config(cfg, vocab), pinned_id=pinned_id, pin_others=pin_others,
                                forced_prefix=forced_prefix,
                                max_new_tokens=cfg.max_new_tokens + len(forced_prefix))

  def rollout(params, ref_params, prompt, prompt_mask, key, tau):
    params = parallel.gather(params, mesh)
    model = nnx.merge(graphdef, params)
    budget = None
    if min_think:
      budget = jax.random.randint(jax.random.fold_in(key, 7), prompt.shape[:1], min_think, cfg.max_think + 1)
    out = engine.generate_traced(model, prompt, prompt_mask, key, tau, gen_cfg, False, think_budget=budget)
    if cfg.beta:  # the reference's None leaves (a LoRA run's frozen base) are the policy's
      ref = nnx.merge(graphdef, reference_model_params(parallel.gather(ref_params, mesh), params))
      target_hidden, _ = engine.rescore(ref, prompt, prompt_mask, out.tokens, out.hidden_inputs, out.gate_noise, tau,
                                        hard=cfg.hard_gate)
      ref_logprobs, _ = output_layer.token_logprobs(ref.gpt2, target_hidden, out.tokens, cfg.temperature,
                                                    cfg.fused_logprobs)
      ref_logprobs = jnp.where(out.mask > 0, ref_logprobs, 0.0)
    else:
      ref_logprobs = jnp.zeros(out.tokens.shape, jnp.float32)
    return out, ref_logprobs

  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return parallel.jit_sharded(rollout, mesh, (parallel.STATE, parallel.STATE, sharded, sharded, replicated,
                                              replicated), sharded)


def shard_rollout(batch: RolloutBatch, mesh, num_generations: int) -> RolloutBatch:
  """A host copy of a RolloutBatch (e.g. `jax.device_get(batch)`) -> sharded by rows on `mesh`, whole groups of
  `num_generations` rows per device."""
  parallel.check_divisible(batch.rewards.shape[0] // num_generations, mesh, 'number of groups (prompts)')
  return parallel.to_global(batch, mesh)


class RolloutCollector:
  """Generates, scores and packs GRPO batches: `collect(params, ref_params, prompts...) -> (RolloutBatch, info)`."""

  def __init__(self, graphdef, cfg: GRPOConfig, tokenizer: Tokenizer, dataset: str, mesh,
               reward_weights: Mapping[str, float] | None = None, answer_match: str = 'lenient',
               length_reward: str = 'flat', min_think: int = 0, pinned_id: int = -1,
               forced_prefix: tuple[int, ...] = (), pin_others: bool = False):
    if not 0 <= min_think <= cfg.max_think:
      raise ValueError(f'grpo.min_think={min_think}: expected 0 (no drawn budgets) up to grpo.max_think='
                       f'{cfg.max_think}.')
    self.cfg, self.tokenizer, self.dataset, self.mesh = cfg, tokenizer, dataset, mesh
    self.reward_weights = None if reward_weights is None else dict(reward_weights)
    self.answer_match, self.length_reward = answer_match, length_reward
    self.rollout_fn = make_rollout_fn(graphdef, cfg, tokenizer.vocab, mesh, min_think, pinned_id, forced_prefix,
                                      pin_others)

  def collect(self, params, ref_params, prompt: np.ndarray, prompt_mask: np.ndarray, references: Sequence[str],
              key: jax.Array, tau: float) -> tuple[RolloutBatch, dict]:
    """B prompts [B,P] (left-padded, global), B reference answers -> (RolloutBatch of B*G rows, info).

    info: the reward dict of `reward.compute_rewards` ([N] numpy arrays) plus `completions` (N decoded texts).
    """
    g = self.cfg.num_generations
    b = prompt.shape[0]
    if len(references) != b:
      raise ValueError(f'{b} prompts but {len(references)} references.')
    parallel.check_divisible(b, self.mesh, 'grpo.prompts_per_step')
    if self.cfg.beta and ref_params is None:
      raise ValueError('grpo.beta > 0 needs the reference parameters (the Stage-1 checkpoint).')
    prompt_g, mask_g = parallel.to_global(
        repeat_prompts(np.asarray(prompt, np.int32), np.asarray(prompt_mask, np.int32), g), self.mesh)
    tau = jnp.float32(tau)
    out, ref_logprobs = self.rollout_fn(params, ref_params, prompt_g, mask_g, key, tau)

    tokens, mask, gates = parallel.to_host((out.tokens, out.mask, out.gates))
    n = tokens.shape[0]
    completions = reward.decode_completions(self.tokenizer, tokens, mask)
    refs = [r for r in references for _ in range(g)]
    r = reward.compute_rewards(tokens, mask, gates, completions, refs, self.dataset, self.tokenizer.vocab,
                               self.reward_weights, self.answer_match, self.length_reward, g)
    inner, outer, _ = reward.span_masks(tokens, mask, self.tokenizer.vocab)
    host = {
        'inner_mask': inner.astype(np.float32), 'outer_mask': outer.astype(np.float32),
        'tau': np.full((n,), float(tau), np.float32), 'rewards': r['total'].astype(np.float32),
        'stats': {name: np.asarray(r[field], np.float32) for name, field in STATS.items()},
    }
    host = parallel.to_global(host, self.mesh)
    batch = RolloutBatch(prompt=prompt_g, prompt_mask=mask_g, completion=out.tokens, completion_mask=out.mask,
                         forced=out.forced, logprobs=out.logprobs, ref_logprobs=ref_logprobs, gates=out.gates,
                         gate_noise=out.gate_noise, hidden_inputs=out.hidden_inputs, **host)
    return batch, dict(r, completions=completions)
