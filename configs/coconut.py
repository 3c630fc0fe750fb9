"""COCONUT and its baselines (issue #9) at tiny scale from scratch on CPU: `--config=configs/coconut.py:<dataset>,<method>`.

dataset: 'prontoqa' | 'prosqa' | 'addition' (2-digit with carries, seed 002's curriculum: 3 stages);
method: 'coconut' | 'coconut_no_curriculum' | 'pause_as_thought' | 'cot' | 'no_cot' | 'pause' | 'dtt'
('dtt': this project's bootstrap on the CoT span, then GRPO, with the same model and data).

python -m dtt_jax.main --config=configs/coconut.py:prontoqa,coconut --workdir=runs/prontoqa_coconut

Every method gets the same model, data, batch and number of supervised steps (`bootstrap.steps`); DTT adds
`grpo.steps` of GRPO. COCONUT's curriculum counts epochs of `coconut.steps_per_epoch` steps (a fraction of a pass
over the data at this budget). `launch/reproduce.sh` runs them all and writes the table (docs/study.md). At GPT-2
size (a GPU): `--config.model.init=gpt2 --config.model.vocab=full`, COCONUT's lr 1e-4 and real epochs
(`--config.coconut.steps_per_epoch=0`).
"""

from configs import base

DATASETS = ('prontoqa', 'prosqa', 'addition')
METHODS = ('coconut', 'coconut_no_curriculum', 'pause_as_thought', 'cot', 'no_cot', 'pause', 'dtt')


def get_config(arg: str = 'prontoqa,coconut'):
  dataset, _, method = arg.partition(',')
  method = method or 'coconut'
  if dataset not in DATASETS or method not in METHODS:
    raise ValueError(f'configs/coconut.py:{arg!r}: expected "<dataset>,<method>" with dataset one of '
                     f'{", ".join(DATASETS)} and method one of {", ".join(METHODS)}.')
  c = base.get_config()
  c.method = 'coconut' if method == 'coconut_no_curriculum' else method
  c.coconut.curriculum = method != 'coconut_no_curriculum'
  c.dataset.name = dataset
  c.model.n_layer, c.model.n_embd, c.model.n_head = 2, 128, 4
  c.data.span = 'cot'  # DTT: the steps inside <|bot|> ... <|eot|>
  c.dataset.valid_size = 256  # ProntoQA's shipped valid set has 200, ProsQA's 300
  c.bootstrap.batch_size = 32
  c.bootstrap.lr = 1e-3
  c.bootstrap.warmup_steps = 20
  c.bootstrap.hinge_lambda = 1.0  # tiny from-scratch DTT models (configs/quickstart.py)
  c.bootstrap.best_metric = 'accuracy'
  c.generate.batch_size = 64
  c.generate.max_think = 0 if method != 'dtt' else 128
  c.grpo.best_metric = 'reward'
  if dataset == 'prontoqa':  # 6 steps of ~15 tokens, True/False answers; paper: c = 1, 6 stages of 5 epochs
    c.dataset.train_size = 9000
    c.model.n_positions = 384
    c.data.max_prompt_len, c.data.max_completion_len = 224, 128
    c.coconut.c_thoughts, c.coconut.max_stage = 1, 6
  elif dataset == 'prosqa':  # 3-6 steps, long questions; paper: c = 1, 6 stages of 5 epochs
    c.dataset.train_size = 9000
    c.model.n_positions = 640
    c.data.max_prompt_len, c.data.max_completion_len = 528, 96
    c.coconut.c_thoughts, c.coconut.max_stage = 1, 6
  else:  # addition, seed 002: stage 0 text CoT, then 1-3 steps latent
    c.dataset.train_size = 20000
    c.dataset.min_digits = c.dataset.max_digits = 2
    c.model.n_positions = 128
    c.data.max_prompt_len, c.data.max_completion_len = 16, 48
    c.coconut.c_thoughts, c.coconut.max_stage = 1, 3
  c.generate.max_new_tokens = c.data.max_completion_len
  c.grpo.max_new_tokens = c.data.max_completion_len
  c.grpo.max_think = c.generate.max_think
  # Budget: "epochs" of 25 steps, one per stage: stages 0-6 then the final one (all latent) for ProntoQA / ProsQA,
  # 200 steps of 32 examples (0.7 passes over 9000 records); addition: stages 0-3 and the final one of 100 steps.
  c.coconut.epochs_per_stage = 1
  c.coconut.steps_per_epoch = 25 if dataset != 'addition' else 100
  c.bootstrap.steps = c.coconut.steps_per_epoch * (c.coconut.max_stage + 2)
  c.bootstrap.eval_every = c.bootstrap.checkpoint_every = 100
  c.grpo.steps = 20
  c.grpo.prompts_per_step = 8
  c.grpo.lr = 1e-4
  c.grpo.eval_every = c.grpo.checkpoint_every = 20
  return c
