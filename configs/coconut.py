"""COCONUT, its baselines and DTT's two recipes, one recipe for all: `--config=configs/coconut.py:<dataset>,<method>`.

method: 'coconut' | 'coconut_no_curriculum' | 'coconut_no_thought' | 'pause_as_thought' | 'cot' | 'no_cot' |
'pause' | 'icot' | 'dtt' | 'dtt_compress' ('coconut_no_thought': COCONUT "w/o thought", the stage schedule removing
steps with no thought; 'icot': stepwise internalization, `coconut.icot_*`; 'dtt': this project's bootstrap on the
CoT span, then GRPO; 'dtt_compress': the bootstrap under COCONUT's stage schedule, latents in place of the first k
steps (`_compress`); the DTT methods at tiny scale only). Every method of a study shares one recipe (`_recipe`).

Tiny scale (default): GPT-2 with 2 layers from scratch on CPU. Datasets: 'prontoqa', 'prosqa', 'addition' (2
digits): d = 128, lr 1e-3, "epochs" of `coconut.steps_per_epoch` = 25 steps (100 for addition), one per stage. The
study suite of docs/study.md (`_suite_schedule`): 'addition2' | 'addition3' | 'addition4' (seed 002's carry steps at
exactly 2, 3 or 4 digits, K = digits + 1) and 'prosqa_mini' (ProsQA's generator on graphs of N = 8 nodes, answer
paths of 3 or more steps, `PROSQA_MINI`, K = 3), with disjoint train / valid / test splits: d = 64, lr 3e-3, epochs
of 50 steps, a text stage of `TEXT_STEPS`, one epoch per latent stage (`,long`, the study's: `LONG_STAGE_EPOCHS`)
and `FINAL_STAGES` times that for the final one. iCoT removes one CoT token every `removal_interval` steps, from
the end of the text stage (suite) or the first step, chosen so that the longest CoT of the training records
(`ICOT_LONGEST`) is gone when the final stage of the others starts.

    python -m dtt_jax.main --config=configs/coconut.py:addition2,coconut,long --workdir=runs/addition2_coconut

Paper scale (`,paper`; dataset 'prontoqa' | 'prosqa' | 'gsm8k'): the official args/<dataset>_coconut.yaml on
pretrained GPT-2: real epochs, COCONUT's optimizer (AdamW, constant lr 1e-4, weight decay 0.01 on every parameter,
no clipping, reset every epoch), dropout 0.1, global batch 128 (32 per GPU on the 4 GPUs of the official runs),
validation and a checkpoint every epoch, the test split scored exactly at the final stage's checkpoint best on
validation. ProntoQA / ProsQA: c = 1, K = 6, 5 epochs per stage, 50 epochs, 128 new tokens. GSM8K: c = 2, K = 3, 3
epochs per stage, 25 epochs, 64 new tokens; COCONUT starts at epoch 3 (stage 1) from a CoT run (official
`resume: 3`):

    python -m dtt_jax.main --config=configs/coconut.py:gsm8k,cot,paper --workdir=runs/gsm8k_cot
    python -m dtt_jax.main --config=configs/coconut.py:gsm8k,coconut,paper --workdir=runs/gsm8k_coconut \\
        --config.init_from=runs/gsm8k_cot

Every method of one scale gets the same model, data, batch, optimizer (the same reset steps) and number of epochs;
COCONUT methods set `bootstrap.steps = 0`, so the budget follows from the schedule; DTT's bootstrap trains as many
steps, then `grpo.steps` of GRPO. `python -m dtt_jax.eval.study` runs the study (docs/study.md).
"""

import importlib

from configs import base
from dtt_jax.data import coconut as coconut_data

DATASETS = ('prontoqa', 'prosqa', 'addition', 'addition2', 'addition3', 'addition4', 'prosqa_mini')
PAPER_DATASETS = ('prontoqa', 'prosqa', 'gsm8k')
METHODS = ('coconut', 'coconut_no_curriculum', 'coconut_no_thought', 'pause_as_thought', 'cot', 'no_cot', 'pause',
           'icot', 'dtt', 'dtt_compress')  # the DTT methods last: tiny scale only
DTT_METHODS = ('dtt', 'dtt_compress')  # config.method 'dtt': the seed's recipe, and the compressing curriculum
SUITE = ('addition2', 'addition3', 'addition4', 'prosqa_mini')  # the CPU suite (docs/study.md: all but addition4)
TEXT_STEPS = {'addition2': 800, 'addition3': 1200, 'addition4': 1600, 'prosqa_mini': 2000}  # stage 0, the text CoT
LONG_STAGE_EPOCHS = 20  # ',long': 1000 steps per latent stage (50 are too few: docs/study_notes.md)
# The final stage lasts as long as this many latent stages (COCONUT's official schedules: 4 on ProsQA / ProntoQA):
# with 150 final steps every method's final layout was short of converged (docs/study_notes.md, matched compute)
FINAL_STAGES = 3
STEP_CURRICULUM = ('coconut', 'pause_as_thought', 'coconut_no_thought', 'dtt_compress')  # from `start_epoch`
# Tokens of the longest CoT (steps + `\n`, GPT-2 tokens) of each tiny training set that fits its lengths.
ICOT_LONGEST = {'prontoqa': 103, 'prosqa': 89, 'addition': 27, 'addition2': 27, 'addition3': 39, 'addition4': 51,
                'prosqa_mini': 55}
PROSQA_MINI = dict(prosqa_nodes=8, prosqa_min_path=3)  # docs/study_notes.md: why
# Official args/<dataset>_coconut.yaml (and run.py's max_new_tokens); prompt / completion lengths cover the data.
PAPER = {
    'prontoqa': dict(c_thoughts=1, max_stage=6, epochs_per_stage=5, num_epochs=50, start_epoch=0,
                     max_new_tokens=128, lengths=(224, 128)),
    'prosqa': dict(c_thoughts=1, max_stage=6, epochs_per_stage=5, num_epochs=50, start_epoch=0,
                   max_new_tokens=128, lengths=(528, 96)),
    'gsm8k': dict(c_thoughts=2, max_stage=3, epochs_per_stage=3, num_epochs=25, start_epoch=3,
                  max_new_tokens=64, lengths=(256, 128)),
}


def get_config(arg: str = 'prontoqa,coconut'):
  dataset, method, scale = (arg.split(',') + ['', ''])[:3]
  method = method or 'coconut'
  paper = scale == 'paper'
  datasets = {'': DATASETS, 'paper': PAPER_DATASETS, 'long': SUITE}.get(scale, ())
  methods = METHODS[:-len(DTT_METHODS)] if paper else METHODS
  if dataset not in datasets or method not in methods:
    raise ValueError(f'configs/coconut.py:{arg!r}: expected "<dataset>,<method>[,paper|long]" with dataset one of '
                     f'{", ".join(DATASETS)} ({", ".join(PAPER_DATASETS)} with "paper", {", ".join(SUITE)} with '
                     f'"long") and method one of {", ".join(METHODS)} ({", ".join(DTT_METHODS)} not with '
                     '"paper").')
  c = _paper(dataset, method) if paper else _tiny(dataset, method, LONG_STAGE_EPOCHS if scale == 'long' else 1)
  c.method = {'coconut_no_curriculum': 'coconut', 'dtt_compress': 'dtt'}.get(method, method)
  c.coconut.curriculum = method != 'coconut_no_curriculum'
  _recipe(c, paper)
  c.generate.max_think = 0 if method not in DTT_METHODS else 128
  epochs = c.coconut.num_epochs or coconut_data.Curriculum.from_config(c.coconut).schedule_epochs
  c.bootstrap.steps = 0 if method not in DTT_METHODS else c.coconut.steps_per_epoch * epochs  # DTT: the same budget
  if method == 'dtt_compress':
    _compress(c)
  return c


def _recipe(c, paper: bool) -> None:
  """What every method of a study shares (one optimizer, dropout, checkpoint choice and scoring rule; a test checks
  it): COCONUT's run.py optimizer (AdamW at a constant bootstrap.lr, weight decay on every parameter), the
  checkpoint scored = the best on validation among those of the method's final layout (COCONUT's evaluation;
  `methods.base.FINAL_METRIC`), answers matched exactly (COCONUT's). At paper scale COCONUT's recipe as it is
  (dropout 0.1, no clipping); at tiny scale, where DTT is compared too, no dropout and gradients clipped at norm 1:
  dropout breaks DTT's recurrent unroll (4% against 94% validation accuracy after 900 bootstrap steps from the
  same CoT checkpoint) and without clipping a DTT run diverged (gradient norm 13 at step 1000, accuracy 72% -> 0%)
  where the clipped one reached 98% (docs/study_notes.md); one value of each must serve every method."""
  b = c.bootstrap
  b.schedule, b.decay, b.warmup_steps = 'constant', 'all', 0
  b.grad_clip = 0.0 if paper else 1.0
  c.model.dropout = 0.1 if paper else 0.0
  b.best_metric = 'accuracy'  # DTT's temperature plateau rule reads it
  b.best_checkpoint = 'final_accuracy'
  c.eval.answer_match = 'exact'


def _compress(c) -> None:
  """The compressing DTT (issue #28): DTT's bootstrap on the CoT span under COCONUT's stage schedule, stage k
  replacing the first k steps by COCONUT's k c latent positions (`data.span='curriculum'`, `coconut.tokens_per_latent`
  = 0), which decoding forces, as COCONUT's head (latents the model must emit itself stayed at chance:
  docs/study_notes.md), from stage K on K c of them or fewer (`latent_jitter`: it then answers at any budget). The
  latents' gate is learned (DTT's own mechanism: each input g h + (1 - g) E[`<|latent|>`], a continuous thought or a
  pause; the hinge pushes g towards 1, the cross-entropy may close it): pinned to 1 (`model.pin_latent`, COCONUT's
  continuous thought) it got through addition3 on none of 3 seeds, learned on 2 of 6, but over the 3000-step final
  stage the hinge pries a second gate open and validation falls (launch/dtt_gate_drift.sh; docs/study_notes.md). The
  steps not yet replaced are fed as token embeddings, as COCONUT feeds them (`span_text='embedded'`: the hinge pushes
  their gate towards 0; gated towards 1, the study's first recipe, stage 1 reached half COCONUT's validation accuracy
  on addition3); the gate head decides everywhere else. GRPO as the seed's recipe for 1000 steps, with the
  group-normalised length reward."""
  c.data.span = 'curriculum'
  c.model.pin_latent = False
  c.coconut.tokens_per_latent = 0
  c.coconut.latent_targets = False
  c.coconut.latent_jitter = True
  c.coconut.span_text = 'embedded'
  c.grpo.length_reward = 'group'
  # RL needs 100+ steps (COMPRESSION.md); addition2 seed 0 (test): bootstrap 88.2%, 100 GRPO steps 93.2%, 1000 steps
  # 99.0% (validation 100% from step 250 on; docs/study_notes.md)
  c.grpo.steps = 1000
  c.grpo.eval_every = c.grpo.checkpoint_every = 50
  c.grpo.max_think = c.coconut.max_stage * c.coconut.c_thoughts + 1


def _paper(dataset: str, method: str):
  c = importlib.import_module(f'configs.{dataset}').get_config()  # pretrained GPT-2, full vocabulary
  p = PAPER[dataset]
  c.dataset.name = dataset
  c.dataset.valid_size = 100_000  # every record
  c.data.max_prompt_len, c.data.max_completion_len = p['lengths']
  for key in ('c_thoughts', 'max_stage', 'epochs_per_stage', 'num_epochs'):
    c.coconut[key] = p[key]
  c.coconut.start_epoch = p['start_epoch'] if method in STEP_CURRICULUM else 0
  c.coconut.icot_delta, c.coconut.icot_lambda = 8.0, 4.0  # the official README's iCoT runs (GSM8K: all from 39)
  c.coconut.icot_remove_all_beyond = 39 if dataset == 'gsm8k' else 0
  c.coconut.steps_per_epoch = 0  # real epochs
  c.coconut.reset_optimizer = 'epoch'
  c.eval.split, c.coconut.eval_every_epochs = 'test', 1
  c.bootstrap.batch_size = 128
  c.bootstrap.lr, c.bootstrap.weight_decay = 1e-4, 0.01
  c.bootstrap.keep_checkpoints = 1  # and the best by validation
  c.bootstrap.log_every = 50
  c.generate.max_new_tokens = p['max_new_tokens']  # after the forced head
  c.generate.batch_size = 64
  return c


def _suite_schedule(c, dataset: str, stage_epochs: int) -> None:
  """The study suite (docs/study.md): GPT-2 with 2 layers, d = 64, lr 3e-3; epochs of 50 steps; a text stage
  (stage 0, CoT) of `TEXT_STEPS` in which CoT learns the task, then `stage_epochs` per latent stage 1..K and
  `FINAL_STAGES` x `stage_epochs` of the final stage (every step latent). Every method trains that many steps; the
  study starts the latent methods from the CoT run's checkpoint at the end of the text stage (`--config.init_from`,
  `init_checkpoint`, `coconut.start_epoch`: the paper's GSM8K recipe), which that run shares with them. No
  optimizer resets inside a run: COCONUT resets every epoch, but these 50-step epochs would reset it 20 times as
  often as the paper's (a 3-digit CoT run reached 0.88 token accuracy at step 600 without resets, 0.83 with them);
  a run started from the CoT checkpoint starts with a fresh optimizer, as at the paper's stage switch."""
  c.model.n_embd = 64
  c.bootstrap.lr = 3e-3
  c.dataset.valid_size = 128
  k = c.coconut
  k.steps_per_epoch, k.epochs_per_stage = 50, stage_epochs
  k.first_stage_epochs = TEXT_STEPS[dataset] // k.steps_per_epoch
  k.num_epochs = k.first_stage_epochs + (k.max_stage + FINAL_STAGES) * stage_epochs
  k.reset_optimizer = 'never'
  c.bootstrap.eval_every = c.bootstrap.checkpoint_every = 100


def _tiny(dataset: str, method: str, stage_epochs: int = 1):
  c = base.get_config()
  c.dataset.name = dataset
  c.model.n_layer, c.model.n_embd, c.model.n_head = 2, 128, 4
  c.data.span = 'cot'  # DTT: the steps inside <|bot|> ... <|eot|>
  c.dataset.valid_size = 256  # ProntoQA's shipped valid set has 200, ProsQA's 300
  c.bootstrap.batch_size = 32
  c.bootstrap.lr = 1e-3  # COCONUT's recipe at a from-scratch learning rate
  c.bootstrap.hinge_lambda = 1.0  # tiny from-scratch DTT models (configs/quickstart.py)
  c.generate.batch_size = 64
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
  elif dataset == 'prosqa_mini':  # 3-5 steps (94% 3) of ~10 tokens; questions of ~70 tokens (0.2% above 112)
    c.dataset.train_size = 20000
    c.dataset.update(PROSQA_MINI)
    c.model.n_positions = 192  # prompt + the forced head of pause-as-thought (5 tokens) + 64 new tokens
    c.data.max_prompt_len, c.data.max_completion_len = 112, 64
    c.coconut.c_thoughts, c.coconut.max_stage = 1, 3
  else:  # addition, seed 002, at n digits (addition: 2): stage 0 text CoT, then 1 to n + 1 steps latent
    digits = int(dataset[len('addition'):] or 2)
    c.dataset.name = 'addition'
    c.dataset.train_size = 20000
    c.dataset.min_digits = c.dataset.max_digits = digits
    c.model.n_positions = 128
    c.data.max_prompt_len, c.data.max_completion_len = 16, {2: 48, 3: 56, 4: 64}[digits]
    c.coconut.c_thoughts, c.coconut.max_stage = 1, digits + 1
    if digits >= 3:  # the 3-digit test bucket has 40,335 problems, the 4-digit one ~4M: a fixed sample of 1000
      c.eval.size = 1000
  c.generate.max_new_tokens = c.data.max_completion_len  # after COCONUT's forced head
  c.grpo.max_new_tokens = c.data.max_completion_len
  c.grpo.max_think = 0 if method not in DTT_METHODS else 128
  if dataset in SUITE:
    _suite_schedule(c, dataset, stage_epochs)
  else:
    # docs/study.md's budget: "epochs" of 25 steps, one per stage: stages 0-6 then the final one (all latent),
    # 200 steps of 32 examples (0.7 passes over 9000 records); addition: stages 0-3 and the final one of 100 steps.
    c.coconut.epochs_per_stage = 1
    c.coconut.steps_per_epoch = 25 if dataset != 'addition' else 100
    c.bootstrap.eval_every = c.bootstrap.checkpoint_every = 100
  k = c.coconut
  # iCoT: one token every `interval` steps from the end of the text stage (study suite) or from the first step, so
  # that the longest CoT is gone when the final stage of the others starts
  schedule = coconut_data.Curriculum.from_config(k)
  k.icot_pretrain_epochs = k.first_stage_epochs
  window = schedule.last_stage_start(k.steps_per_epoch) - k.icot_pretrain_epochs * k.steps_per_epoch
  k.icot_delta = k.steps_per_epoch / max(1, window // ICOT_LONGEST[dataset])
  c.grpo.steps = 20
  c.grpo.prompts_per_step = 8
  c.grpo.lr = 1e-4
  c.grpo.eval_every = c.grpo.checkpoint_every = 20
  return c
