"""ProsQA with pretrained GPT-2 (hub 'gpt2', full vocabulary). Train: the project's generator (COCONUT
Algorithm 1; the official train file is not distributable here) unless dataset.train_path is given; valid: the file.

python -m dtt_jax.main --config=configs/prosqa.py --workdir=runs/prosqa
Offline: --config.model.init=/path/to/hf_gpt2_dir, or --config.model.init=scratch --config.model.vocab=compact.
COCONUT and its baselines with the official recipe: configs/coconut.py:prosqa,<method>,paper.
"""

from configs import base


def get_config(stage: str = ''):
  c = base.get_config()
  c.dataset.name = 'prosqa'
  c.model.init = 'gpt2'
  c.model.vocab = 'full'
  c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_positions = 12, 768, 12, 1024  # used by 'scratch'
  c.data.max_prompt_len = 384
  c.data.max_completion_len = 32
  c.bootstrap.steps = 2000
  c.bootstrap.batch_size = 32
  c.bootstrap.lr = 1e-4
  c.bootstrap.eval_every = 500
  c.bootstrap.checkpoint_every = 500
  c.generate.max_new_tokens = 32
  c.grpo.steps = 500
  c.grpo.prompts_per_step = 16
  c.grpo.lr = 1e-6
  c.grpo.max_new_tokens = 32
  c.grpo.eval_every = 100
  c.grpo.checkpoint_every = 100
  c.stage = stage or c.stage
  return c
