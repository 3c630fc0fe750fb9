"""Stage 2, GRPO (SPEC §7): rollouts (`rollout.py`) and the pure sharded update (`grpo.py`)."""

from dtt_jax.rl.grpo import GRPOConfig, group_advantages, grpo_loss, make_grpo_optimizer, make_grpo_step
from dtt_jax.rl.rollout import RolloutBatch, RolloutCollector, make_rollout_fn, shard_rollout

__all__ = ['GRPOConfig', 'RolloutBatch', 'RolloutCollector', 'group_advantages', 'grpo_loss', 'make_grpo_optimizer',
           'make_grpo_step', 'make_rollout_fn', 'shard_rollout']
