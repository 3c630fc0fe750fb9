"""The composite GRPO reward (SPEC §8)."""

from dtt_jax.reward.reward import COMPONENTS, DEFAULT_WEIGHTS, compute_rewards, decode_completions, span_masks

__all__ = ['COMPONENTS', 'DEFAULT_WEIGHTS', 'compute_rewards', 'decode_completions', 'span_masks']
