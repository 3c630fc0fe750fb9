"""The composite GRPO reward (SPEC §8)."""

from dtt_jax.reward.reward import (COMPONENTS, DEFAULT_WEIGHTS, LENGTH_REWARDS, compute_rewards, decode_completions,
                                   group_length_reward, span_masks)

__all__ = ['COMPONENTS', 'DEFAULT_WEIGHTS', 'LENGTH_REWARDS', 'compute_rewards', 'decode_completions',
           'group_length_reward', 'span_masks']
