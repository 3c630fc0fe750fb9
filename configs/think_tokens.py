"""Learned thinking tokens (seed 003, `config.method='think_tokens'`, dtt_jax/methods/think_tokens/) at tiny scale
on CPU: a 2-layer d=128 teacher trained from scratch on generated 2-digit addition (text with its carry steps), then
GRPO on K=8 thinking tokens, then the evaluation in <workdir>/eval/valid/think/. A few minutes on 2 CPU cores.

python -m dtt_jax.main --config=configs/think_tokens.py --workdir=runs/think_tokens
Variants from the command line: --config.think.mode=next_token; --config.dataset.name=prontoqa (the shipped
ProntoQA files; sequences of ~320 tokens, so slower); --config.think.train=rows (only the thinking rows train).
The suffix picks the stage: `:bootstrap` (the teacher), `:grpo` (the thinking stage, from that teacher), `:eval`.
"""

from configs import base


def get_config(stage: str = ''):
  c = base.get_config()
  c.method = 'think_tokens'
  c.dataset.name = 'addition'
  c.dataset.train_size = 5000
  c.dataset.max_digits = 2
  c.model.n_layer, c.model.n_embd, c.model.n_head = 2, 128, 4
  c.model.n_positions = 512  # ProntoQA texts reach ~320 tokens; unused positions cost nothing
  t = c.think
  t.num_tokens = 8
  t.mode = 'teacher'
  t.teacher_steps = 600
  t.teacher_lr = 2e-3
  t.batch_size = 32
  t.steps = 200
  t.prompts_per_step = 8
  t.num_generations = 8
  t.lr = 1e-4
  t.rows_lr_mult = 100.0  # fresh rows need large steps (measured: at 10 the thinking bias barely moves)
  t.real_tokens = 4
  t.max_think = 3
  t.eval_size = 64
  t.eval_every = 50
  t.checkpoint_every = 100
  c.stage = stage or c.stage
  return c
