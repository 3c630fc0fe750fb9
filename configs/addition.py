"""Generated multi-digit addition (2-4 digits), tiny model from scratch with the compact vocabulary.

python -m dtt_jax.main --config=configs/addition.py --workdir=runs/addition
"""

from configs import base


def get_config(stage: str = ''):
  c = base.get_config()
  c.dataset.name = 'addition'
  c.dataset.train_size = 50000
  c.model.n_layer, c.model.n_embd, c.model.n_head = 4, 256, 4
  c.data.max_prompt_len, c.data.max_completion_len = 16, 24
  c.bootstrap.steps = 3000
  # At lambda 0.1 the many outer positions win: the gate closes everywhere and, once tau is small, gets no
  # gradient back (measured on this config); at 1.0 the inner gate opens (teacher-forced mean 1.0 by step 200).
  c.bootstrap.hinge_lambda = 1.0
  c.stage = stage or c.stage
  return c
