"""GSM8K with pretrained GPT-2 (hub 'gpt2', full vocabulary), as in the seeds.

python -m dtt_jax.main --config=configs/gsm8k.py --workdir=runs/gsm8k
Offline or from scratch: --config.model.init=/path/to/hf_gpt2_dir, or
--config.model.init=scratch --config.model.vocab=compact (a tiny model trained from scratch).
COCONUT and its baselines with the official recipe: configs/coconut.py:gsm8k,<method>,paper.
"""

from configs import base


def get_config(stage: str = ''):
  c = base.get_config()
  c.dataset.name = 'gsm8k'
  c.model.init = 'gpt2'
  c.model.vocab = 'full'
  c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_positions = 12, 768, 12, 1024  # used by 'scratch'
  c.data.max_prompt_len = 160
  c.data.max_completion_len = 64
  c.data.span = 'none'
  c.bootstrap.steps = 3000
  c.bootstrap.batch_size = 32
  c.bootstrap.lr = 1e-4
  c.bootstrap.warmup_steps = 100
  c.bootstrap.eval_every = 500
  c.bootstrap.checkpoint_every = 500
  c.generate.max_new_tokens = 64
  c.generate.max_think = 48
  c.grpo.steps = 1000
  c.grpo.prompts_per_step = 16
  c.grpo.lr = 1e-6
  c.grpo.max_new_tokens = 64
  c.grpo.max_think = 48
  c.grpo.eval_every = 100
  c.grpo.checkpoint_every = 100
  c.stage = stage or c.stage
  return c
