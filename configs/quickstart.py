"""The embedded default: a tiny model trained from scratch on generated 2-digit addition, the whole pipeline
(bootstrap, GRPO, evaluation on the held-out test problems) offline in a few minutes on 2 CPU cores, ending with a
summary of every stage and `eval/training_curves.png`.

python -m dtt_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

The reasoning span is the sum worked column by column, least significant first: the two operand digits and the
digit written (`47 + 85 =` -> `<|bot|>7 5 2 4 8 3 1<|eot|>132`); the carries are never written, they live in the
hidden states the gate feeds back. Span and answer are one token per digit (GPT-2's BPE would make `132` one of ~180
answer tokens that the model must learn to spell from the digits; measured: the span right, the answer wrong).
"""

from configs import base


def get_config(stage: str = ''):
  c = base.get_config()
  c.dataset.name = 'addition'
  c.dataset.train_size = 20000
  c.dataset.min_digits = c.dataset.max_digits = 2
  c.model.n_layer, c.model.n_embd, c.model.n_head = 2, 128, 4
  c.data.span = 'cot'
  c.data.span_text = 'column_digits'  # dtt_jax/data/samples.py
  c.data.digit_tokens = True
  c.data.max_prompt_len, c.data.max_completion_len = 8, 14  # the longest completion has 13 tokens
  c.generate.max_new_tokens = 14
  c.generate.max_think = 0
  c.bootstrap.steps = 1500
  c.bootstrap.lr = 3e-3
  c.bootstrap.eval_every = c.bootstrap.checkpoint_every = 250
  # At lambda 0.1 the many outer positions win: the gate closes everywhere and, once tau is small, gets no
  # gradient back; at 1.0 the inner gate opens (mean >= 0.98 by step 250).
  c.bootstrap.hinge_lambda = 1.0
  # Gate noise in the bootstrap slowed learning on this task (validation accuracy at 1000 steps 0.16 with, 0.33
  # without, span and answer in BPE tokens).
  c.bootstrap.gate_noise = False
  # GRPO as configs/addition_cot.py (docs/results.md): exact re-scoring through the recurrence, noise-free gates,
  # a low sampling temperature, tau kept at the bootstrap's final 0.1, many prompts per step and a small step.
  c.grpo.steps = 20
  c.grpo.prompts_per_step = 32
  c.grpo.num_generations = 8
  c.grpo.lr = 2e-5
  c.grpo.rescore = 'recurrent'
  c.grpo.gate_noise = False
  c.grpo.temperature = 0.5
  c.grpo.tau0 = 0.1
  c.grpo.max_new_tokens = 14
  c.grpo.max_think = 8
  c.grpo.eval_every = c.grpo.checkpoint_every = 10
  c.eval.split = 'test'  # every 2-digit problem of the test hash bucket, never trained on
  c.stage = stage or c.stage
  return c
