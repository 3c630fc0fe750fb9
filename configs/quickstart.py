"""The embedded default: a tiny model trained from scratch on generated addition, the whole pipeline (bootstrap,
GRPO, evaluation) offline in a few minutes on 2 CPU cores.

python -m dtt_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
"""

from configs import base


def get_config(stage: str = ''):
  c = base.get_config()
  c.dataset.name = 'addition'
  c.dataset.train_size = 20000
  c.dataset.max_digits = 3
  c.model.n_layer, c.model.n_embd, c.model.n_head = 2, 128, 4
  c.data.max_prompt_len, c.data.max_completion_len = 16, 24
  c.bootstrap.steps = 600
  c.bootstrap.batch_size = 32
  c.bootstrap.eval_every = 200
  c.bootstrap.checkpoint_every = 200
  c.generate.max_new_tokens = 20
  c.grpo.steps = 60
  c.grpo.prompts_per_step = 8
  c.grpo.num_generations = 8
  c.grpo.lr = 5e-5
  c.grpo.max_new_tokens = 20
  c.grpo.eval_every = 20
  c.grpo.checkpoint_every = 20
  # At lambda 0.1 the many outer positions win: the gate closes everywhere and, once tau is small, gets no
  # gradient back (measured on this config); at 1.0 the inner gate opens (teacher-forced mean 1.0 by step 200).
  c.bootstrap.hinge_lambda = 1.0
  c.stage = stage or c.stage
  return c
