"""One function per stage, called by `main`: bootstrap, grpo, eval, or the whole pipeline.

Workdir layout:
    vocab.json                      model-id <-> GPT-2-id map (compact vocabulary) — fixed at the first run
    config.json                     the resolved config of the last run
    lock.json                       the run holding the workdir (dtt_jax/workdir.py)
    bootstrap/config.json           the config the stage started with (checked before it resumes)
    bootstrap/checkpoints/<step>/   Stage-1 Orbax checkpoints (latest k + best by validation)
    grpo/checkpoints/<step>/        Stage-2 checkpoints
    eval/<split or file>/<stage>/   metrics.json, completions.jsonl/.csv, histograms and gate plots (PNG)
    metrics.jsonl, tensorboard/     training curves of every stage
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from dtt_jax import data as data_lib
from dtt_jax import parallel, tokens
from dtt_jax import workdir as workdir_lib
from dtt_jax.checkpoint import Checkpointer
from dtt_jax.eval import evaluate as eval_lib
from dtt_jax.eval import heldout
from dtt_jax.eval import report
from dtt_jax.eval import summary
from dtt_jax.metrics import MetricWriter
from dtt_jax.model import FAMILIES, build_model, configured_family, lora
from dtt_jax.model import dtt as dtt_lib
from dtt_jax.rl import grpo, rollout
from dtt_jax.data import coconut as coconut_data
from dtt_jax.train import bootstrap, loop, state as state_lib
from dtt_jax.train import coconut as coconut_train
from dtt_jax.train.temperature import Temperature

log = logging.getLogger(__name__)

STAGES = ('bootstrap', 'grpo', 'eval', 'pipeline')
METHODS = ('dtt', 'think_tokens') + coconut_data.METHODS
SHARED_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, 'shared',
                                'data', 'gpt2_tokenizer')


def init_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
  """Multi-host setup via `jax.distributed` (no-op for a single process)."""
  if not coordinator:
    return
  if coordinator == 'auto':  # SLURM / TPU pods / GPU clusters: JAX detects everything from the environment
    jax.distributed.initialize()
  else:
    if num_processes <= 0 or process_id < 0:
      raise ValueError('--coordinator host:port needs --num_processes and --process_id.')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU devices only; GPUs/TPUs use their own
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  log.info('jax.distributed: process %d of %d, %d global devices.', jax.process_index(), jax.process_count(),
           jax.device_count())


def check_config(c: ml_collections.ConfigDict) -> None:
  """Value checks that name the config key and what it expects."""
  def expect(key, value, allowed):
    if value not in allowed:
      raise ValueError(f'config.{key}={value!r}: expected one of {", ".join(map(repr, allowed))}.')
  expect('stage', c.stage, STAGES)
  expect('method', c.method, METHODS)
  if is_coconut(c):
    coconut_train.check_config(c, curriculum(c))  # raises on bad values, and on a budget that ends too early
    if c.stage == 'grpo':
      raise ValueError(f'config.stage="grpo" does not apply to config.method={c.method!r} (supervised only): use '
                       '"bootstrap", "eval" or "pipeline".')
  elif c.model.get('dropout', 0.0):
    raise ValueError(f'config.model.dropout={c.model.dropout} applies only to the COCONUT methods '
                     f'({", ".join(coconut_data.METHODS)}): set it to 0 for config.method={c.method!r}.')
  expect('dataset.name', c.dataset.name, data_lib.DATASETS)
  expect('model.vocab', c.model.vocab, ('compact', 'full'))
  expect('model.family', c.model.get('family', 'gpt2'), FAMILIES)  # runs from before the key: GPT-2
  if c.model.init == 'scratch' and c.model.get('family', 'gpt2') != 'gpt2':
    _check_llama_sizes(c.model)
  expect('data.span', c.data.span, ('none', 'cot'))
  if c.model.vocab == 'compact' and c.model.init != 'scratch':
    raise ValueError('config.model.vocab="compact" only works with config.model.init="scratch" (a pretrained model '
                     'keeps the full GPT-2 vocabulary).')
  steps = () if is_coconut(c) else ('bootstrap.steps',)  # COCONUT: 0 = from the schedule (coconut_train)
  for key in steps + ('bootstrap.batch_size', 'bootstrap.microbatches', 'generate.batch_size'):
    section, name = key.split('.')
    if c[section][name] <= 0:
      raise ValueError(f'config.{key}={c[section][name]} must be positive.')
  expect('model.gate', c.model.get('gate', 'dtt'), dtt_lib.GATES)  # runs from before the key: 'dtt'
  if c.model.get('gate') == 'hrpo':
    for key in ('bootstrap.hard_gate', 'grpo.hard_gate', 'grpo.gate_as_action', 'model.use_projection'):
      section, name = key.split('.')
      if c[section][name]:
        raise ValueError(f'config.{key}=True does not apply to config.model.gate="hrpo" (a deterministic gate with '
                         'no projection): set it to False.')
  if c.get('lora') and c.lora.enabled:
    # raises on a bad rank, alpha, target or module (of a hub checkpoint's family once build_model fetched it)
    lora.LoRAConfig.from_config(c.lora, configured_family(c.model))
  if c.bootstrap.batch_size % c.bootstrap.microbatches:
    raise ValueError(f'config.bootstrap.batch_size={c.bootstrap.batch_size} must be divisible by '
                     f'config.bootstrap.microbatches={c.bootstrap.microbatches}.')
  grpo.check_config(c.grpo)  # raises on bad GRPO values (loss_agg, gate_as_action without gate_noise, ...)


def _check_llama_sizes(m) -> None:
  """The sizes of a scratch Llama / Qwen2 (`config.model`), each error naming its key."""
  if m.n_embd % m.n_head or (m.n_embd // m.n_head) % 2:
    raise ValueError(f'config.model.n_embd={m.n_embd} / config.model.n_head={m.n_head}: expected an even integer '
                     '(the head dimension, rotated in pairs by RoPE).')
  if m.n_kv_head < 0 or (m.n_kv_head and m.n_head % m.n_kv_head):
    raise ValueError(f'config.model.n_kv_head={m.n_kv_head}: expected 0 (= n_head) or a divisor of '
                     f'config.model.n_head={m.n_head}.')
  if m.intermediate_size < 0:
    raise ValueError(f'config.model.intermediate_size={m.intermediate_size}: expected 0 (= 4 * n_embd) or a '
                     'positive width.')
  if m.rope_theta <= 0:
    raise ValueError(f'config.model.rope_theta={m.rope_theta} must be > 0.')


def is_coconut(c) -> bool:
  """COCONUT or one of its baselines: trained by `run_coconut` in place of the bootstrap, no GRPO."""
  return c.method in coconut_data.METHODS


def curriculum(c) -> coconut_data.Curriculum:
  return coconut_data.Curriculum.from_config(c.coconut)


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  tokenizer: tokens.Tokenizer
  train: list[dict]  # records {question, steps, answer}
  valid: list[dict]

  @property
  def vocab(self) -> tokens.Vocab:
    return self.tokenizer.vocab


def _tokenizer_source(c) -> str:
  if c.model.tokenizer:
    return c.model.tokenizer
  return SHARED_TOKENIZER if os.path.isdir(SHARED_TOKENIZER) else tokens.DEFAULT_TOKENIZER


def setup(config, workdir: str) -> Experiment:
  """Data, tokenizer and vocabulary (the compact map is fixed at the first run and reused on resume)."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.check_resume(config, workdir)  # before anything in the workdir changes
  hf = tokens.load_tokenizer(_tokenizer_source(config))
  train, valid = data_lib.load_splits(config.dataset, seed=config.seed)
  vocab_path = os.path.join(workdir, 'vocab.json')
  source_vocab = os.path.join(config.init_from, 'vocab.json') if config.get('init_from') else ''
  if os.path.exists(vocab_path) or os.path.exists(source_vocab):  # fixed by the first run / the model's source
    with open(vocab_path if os.path.exists(vocab_path) else source_vocab) as f:
      vocab = tokens.Vocab.from_json(f.read())
  elif config.model.vocab == 'full':
    vocab = tokens.Vocab.full()
  else:
    layouts = coconut_data.all_layout_texts(train + valid) if is_coconut(config) else ()
    vocab = data_lib.compact_vocab(train + valid + _generated_test_records(config, valid), hf, extra_texts=layouts)
  if jax.process_index() == 0:
    with open(vocab_path, 'w') as f:
      f.write(vocab.to_json())
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = parallel.make_mesh(config.num_devices or None)
  log.info('%s: %d train / %d valid records, vocabulary %d tokens (%d rows), %d devices.', config.dataset.name,
           len(train), len(valid), vocab.num_tokens, vocab.num_rows, parallel.num_shards(mesh))
  return Experiment(config, workdir, mesh, tokens.Tokenizer(hf, vocab), train, valid)


def _generated_test_records(config, valid: list[dict]) -> list[dict]:
  """The test records `config.eval` reads, for a generated dataset evaluated on its test split: their tokens join the
  compact vocabulary (which tokens exist, not their answers), so a small train split still covers every question."""
  if config.dataset.name in data_lib.GENERATED and config.eval.split == 'test' and not config.eval.path:
    return heldout.eval_records(config, valid)[1]
  return []


def _validation_prompts(exp: Experiment):
  """Held-out prompts [N,P] (left-padded), questions, reference answers."""
  records = exp.valid[:exp.config.dataset.valid_size]
  prompts = data_lib.build_prompts(records, exp.tokenizer, exp.config.data.max_prompt_len)
  return prompts


def make_validate(exp: Experiment, graphdef):
  """validate(state, step, tau) -> greedy-generation metrics on the held-out prompts, plus teacher-forced gate means
  on the same examples with a filler span in every one (`tf_gate_inner`, `tf_gate_outer`)."""
  c = exp.config
  prompts = _validation_prompts(exp)
  gen_cfg = eval_lib.greedy_config(exp.vocab, c.generate.max_new_tokens, c.generate.max_think)
  records = exp.valid[:c.dataset.valid_size]
  span_cfg = dataclasses.replace(data_lib.SampleConfig.from_config(c.data), filler_prob=1.0)
  span_batch = data_lib.stage1_batch(records, exp.tokenizer, span_cfg, seed=c.seed)

  def validate(state, step, tau):
    del step
    result = eval_lib.evaluate(nnx.merge(graphdef, state.params), prompts.prompt, prompts.prompt_mask,
                               prompts.questions, prompts.answers, exp.tokenizer, c.dataset.name, gen_cfg, tau,
                               c.generate.batch_size, exp.mesh)
    return {**result.metrics, **eval_lib.teacher_forced_gates(graphdef, state.params, span_batch, tau,
                                                              c.bootstrap.noisy_span_scale)}

  return validate


def bootstrap_optimizer(c, schedule_steps: int = 0):
  """AdamW of `config.bootstrap`, its warmup + cosine over `schedule_steps` (default: the stage's steps)."""
  b = c.bootstrap
  return state_lib.make_optimizer(b.lr, schedule_steps or b.steps, b.warmup_steps, b.weight_decay, b.grad_clip, b.gate_lr_mult,
                                  train_modules=lora.configured_train_modules(c.get('lora')))


def initial_state(exp: Experiment, tx):
  model = build_model(exp.config.model, exp.vocab, seed=exp.config.seed, lora_cfg=exp.config.get('lora'))
  graphdef, params = state_lib.split_model(model)
  state = parallel.replicate(state_lib.init_state(params, tx, seed=exp.config.seed), exp.mesh)
  return graphdef, state


def run_bootstrap(exp: Experiment) -> loop.LoopResult:
  if is_coconut(exp.config):
    return run_coconut(exp)
  c, b = exp.config, exp.config.bootstrap
  parallel.check_divisible(b.batch_size, exp.mesh, 'bootstrap.batch_size')
  tx = bootstrap_optimizer(c)
  graphdef, state = initial_state(exp, tx)
  train_step = bootstrap.make_train_step(graphdef, tx, bootstrap.LossConfig.from_config(b), exp.mesh, b.microbatches)
  batches = data_lib.stage1_iterator(exp.train, exp.tokenizer, c.data, b.batch_size, seed=c.seed,
                                     process_index=jax.process_index(), process_count=jax.process_count())

  def step_fn(state, batch, tau):
    return train_step(state, parallel.shard_batch(batch, exp.mesh), tau)

  return _run_stage(exp, 'bootstrap', state, step_fn, batches, graphdef)


def coconut_batches(exp: Experiment, records, batch_size: int) -> coconut_data.CurriculumBatches:
  c = exp.config
  return coconut_data.CurriculumBatches(records, c.method, curriculum(c), exp.tokenizer, batch_size,
                                        c.data.max_prompt_len, c.data.max_completion_len, c.coconut.steps_per_epoch,
                                        seed=c.seed, process_index=jax.process_index(),
                                        process_count=jax.process_count())


def run_coconut(exp: Experiment) -> loop.LoopResult:
  """COCONUT or a baseline (`config.method`) under the schedule of `config.coconut`, in place of the bootstrap
  (same stage directory, loop and checkpoints; `train/coconut.py` has the optimizer recipe and the budget). The
  optimizer state restarts at the same steps for every method (`Curriculum.reset_steps`). `config.init_from`: a
  workdir whose bootstrap result (e.g. a CoT run, best by validation) gives the initial weights."""
  c, b = exp.config, exp.config.bootstrap
  parallel.check_divisible(b.batch_size, exp.mesh, 'bootstrap.batch_size')
  batches = coconut_batches(exp, exp.train, b.batch_size)
  schedule, per_epoch = curriculum(c), batches.steps_per_epoch
  steps = coconut_train.train_steps(c, schedule, per_epoch)
  exp = dataclasses.replace(exp, config=coconut_train.resolve_config(c, per_epoch, steps))
  tx = coconut_train.make_optimizer(c, per_epoch, steps, lora.configured_train_modules(c.get('lora')))
  resets = set(batches.reset_steps(steps, coconut_train.reset_every_epochs(c)))
  if c.get('init_from'):
    graphdef, params = stage_params(dataclasses.replace(exp, workdir=c.init_from), 'bootstrap')
    state = parallel.replicate(state_lib.init_state(jax.device_get(params), tx, seed=c.seed), exp.mesh)
  else:
    graphdef, state = initial_state(exp, tx)
  train_step = coconut_train.make_train_step(graphdef, tx, exp.mesh, b.microbatches, c.model.get('dropout', 0.0))
  log.info('%s: %d steps of %d per epoch from epoch %d; stages start at steps %s; optimizer (%s) resets at %d '
           'steps.', c.method, steps, per_epoch, schedule.start_epoch, schedule.stage_starts(per_epoch, steps),
           c.coconut.optimizer, len(resets))

  def step_fn(state, batch, tau):
    step = batches.step - 1  # this batch's step
    if step in resets:
      state = state.replace(opt_state=parallel.replicate(tx.init(state.params), exp.mesh))
    state, metrics = train_step(state, batch, tau)
    return state, dict(metrics, stage=float(batches.stage(step)), epoch=float(schedule.epoch_at_step(step, per_epoch)))

  return _run_stage(exp, 'bootstrap', state, step_fn, batches, graphdef,
                    make_coconut_validate(exp, graphdef, batches.stage))


def make_coconut_validate(exp: Experiment, graphdef, stage_at):
  """validate(state, step, tau) -> at the stage of the last trained step: greedy accuracy (`coconut.answer_match`)
  and generated tokens on the held-out prompts, teacher-forced CE / token / sequence accuracy on the held-out
  samples."""
  c = exp.config
  prompts = _validation_prompts(exp)
  held_out = coconut_data.fitting_records(exp.valid[:c.dataset.valid_size], c.method, curriculum(c), exp.tokenizer,
                                          c.data.max_prompt_len, c.data.max_completion_len)

  def validate(state, step, tau):
    del tau
    stage = stage_at(max(step - 1, 0))
    gen_cfg = coconut_train.generate_config(c.method, stage, curriculum(c), exp.vocab, c.generate.max_new_tokens)
    metrics, _ = coconut_train.evaluate(nnx.merge(graphdef, state.params), prompts, exp.tokenizer, c.dataset.name,
                                        gen_cfg, c.generate.batch_size, exp.mesh, c.coconut.answer_match)
    batch = coconut_data.build_batch(held_out, c.method, stage, curriculum(c), exp.tokenizer, c.data.max_prompt_len,
                                     c.data.max_completion_len)
    return {'stage': float(stage), **metrics, **coconut_train.teacher_forced_metrics(graphdef, state.params, batch)}

  return validate


def _run_stage(exp: Experiment, stage: str, state, step_fn, data, graphdef, validate=None) -> loop.LoopResult:
  """The shared loop of a stage with its `config.<stage>` section: checkpoints, metrics, temperature, validation."""
  c, s = exp.config, exp.config[stage]
  ckpt = Checkpointer(os.path.join(exp.workdir, stage, 'checkpoints'), keep=s.keep_checkpoints,
                      best_metric=s.get('best_checkpoint'))
  writer = MetricWriter(exp.workdir, c.get('wandb'), c.to_dict())
  temperature = Temperature(s.tau0, s.tau_min, s.steps, s.patience)
  loop_cfg = loop.LoopConfig(stage, s.steps, s.log_every, s.eval_every, s.checkpoint_every, s.best_metric)
  workdir_lib.record_stage_config(exp.workdir, stage, c)
  try:
    return loop.run(loop_cfg, state, step_fn, data, temperature, ckpt, writer,
                    validate or make_validate(exp, graphdef),
                    meta={'vocab': json.loads(exp.vocab.to_json())})
  finally:
    ckpt.close()
    writer.close()


def stage_checkpoint(exp: Experiment, stage: str, which='best') -> tuple[int, str]:
  """(step, why) of a finished stage's checkpoint in the workdir: `which` is 'best' (by `<stage>.best_checkpoint`),
  'latest' or a step number."""
  ckpt = Checkpointer(os.path.join(exp.workdir, stage, 'checkpoints'), async_save=False,
                      best_metric=exp.config[stage].get('best_checkpoint'))
  try:
    if not ckpt.steps():
      raise FileNotFoundError(f'No {stage} checkpoint in {exp.workdir}/{stage}/checkpoints: run the {stage} stage '
                              f'first (--config.stage={stage}) or set config.init_from.')
    return ckpt.choose(which)
  finally:
    ckpt.close()


def stage_params(exp: Experiment, stage: str, which='best'):
  """(graphdef, params) of a finished stage's checkpoint in the workdir (`which`: see `stage_checkpoint`).

  With `config.lora.enabled` and a checkpoint without adapters (a trained model to fine-tune, e.g. a full bootstrap
  given as `config.init_from`), the checkpoint gives the base and the model keeps its fresh adapters: B = 0, so it
  computes exactly the checkpoint's function. A checkpoint with adapters (a LoRA run) needs the same adapters."""
  graphdef, params = state_lib.split_model(build_model(exp.config.model, exp.vocab, seed=exp.config.seed,
                                                      lora_cfg=exp.config.get('lora')))
  step, why = stage_checkpoint(exp, stage, which)
  ckpt = Checkpointer(os.path.join(exp.workdir, stage, 'checkpoints'), async_save=False)
  path = os.path.join(ckpt.directory, str(step))
  saved = lora.adapter_shapes(ocp.PyTreeCheckpointHandler().metadata(epath.Path(path, 'state')).tree['params'])
  wanted = lora.adapter_shapes(params)
  fresh_adapters = bool(wanted) and not saved
  if saved != wanted and not fresh_adapters:
    ckpt.close()
    raise ValueError(f'{path} holds LoRA adapters ({lora.describe_adapters(saved)}) but config.lora gives '
                     f'({lora.describe_adapters(wanted)}): set config.lora.enabled, .rank and .targets as in the run '
                     'that trained it (its workdir\'s config.json).')
  replicated = parallel.replicated(exp.mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          lora.without_adapters(params) if fresh_adapters else params)
  restored = ckpt.restore_params(step, abstract)
  ckpt.close()
  log.info('Loaded %s parameters from %s: %s.', stage, path, why)
  if fresh_adapters:
    restored = jax.device_put(lora.with_adapters(restored, params), replicated)  # restored ones: no copy
    log.info('The checkpoint has no LoRA adapters: fresh ones (%s, B = 0) on its weights.',
             lora.describe_adapters(wanted))
  return graphdef, restored


def grpo_start_params(exp: Experiment):
  """GRPO's initial policy and frozen reference: `config.init_from` (a workdir holding a bootstrap result) or this
  workdir's bootstrap result."""
  source = exp
  if exp.config.get('init_from'):
    source = dataclasses.replace(exp, workdir=exp.config.init_from)
  return stage_params(source, 'bootstrap')


def run_grpo(exp: Experiment) -> loop.LoopResult:
  c, g = exp.config, exp.config.grpo
  cfg = grpo.GRPOConfig.from_config(g)
  graphdef, start = grpo_start_params(exp)
  reference = parallel.replicate(jax.device_get(start), exp.mesh) if cfg.beta else None
  tx = grpo.make_grpo_optimizer(g, lora.configured_train_modules(c.get('lora')))
  state = parallel.replicate(state_lib.init_state(jax.device_get(start), tx, seed=c.seed + 1), exp.mesh)
  grpo_step = grpo.make_grpo_step(graphdef, tx, cfg, exp.mesh)
  collector = rollout.RolloutCollector(graphdef, cfg, exp.tokenizer, c.dataset.name, exp.mesh,
                                       dict(g.reward_weights))
  prompts = data_lib.prompt_iterator(exp.train, exp.tokenizer, c.data.max_prompt_len, g.prompts_per_step,
                                     seed=c.seed)

  def step_fn(state, batch, tau):
    key = state_lib.step_key(state, salt=1)
    rollout_batch, info = collector.collect(state.params, reference, batch.prompt, batch.prompt_mask, batch.answers,
                                            key, tau)
    state, metrics = grpo_step(state, rollout_batch)
    return state, dict(metrics, **{f'reward_{k}': float(np.mean(info[k])) for k in ('structure', 'correctness',
                                                                                     'efficiency', 'gate', 'total')})

  return _run_stage(exp, 'grpo', state, step_fn, prompts, graphdef)


def run_eval(exp: Experiment) -> dict[str, float]:
  """Greedy evaluation of each trained stage of `config.eval.stages` (at `config.eval.checkpoint`) on the records of
  `config.eval` (eval/heldout.py); reports in `<workdir>/eval/<split or file>/<stage>/`. Returns the metrics of the
  last stage evaluated."""
  c = exp.config
  if is_coconut(c):
    return run_coconut_eval(exp)
  name, records = heldout.eval_records(c, exp.valid)
  prompts = data_lib.build_prompts(records, exp.tokenizer, c.data.max_prompt_len)
  gen_cfg = eval_lib.greedy_config(exp.vocab, c.generate.max_new_tokens, c.generate.max_think, return_hidden=True)
  stages = [s for s in c.eval.stages if workdir_lib.checkpoint_steps(os.path.join(exp.workdir, s))]
  if not stages:
    raise FileNotFoundError(f'No checkpoint of {", ".join(c.eval.stages)} in {exp.workdir}: train first '
                            '(--config.stage=pipeline).')
  metrics = {}
  for stage in stages:
    step, why = stage_checkpoint(exp, stage, c.eval.checkpoint)
    graphdef, params = stage_params(exp, stage, str(step))
    tau = c[stage].tau_min
    result = eval_lib.evaluate(nnx.merge(graphdef, params), prompts.prompt, prompts.prompt_mask, prompts.questions,
                               prompts.answers, exp.tokenizer, c.dataset.name, gen_cfg, tau, c.generate.batch_size,
                               exp.mesh, dict(c.grpo.reward_weights))
    info = {'method': c.method, 'stage': stage, 'step': step, 'split': name, 'config': heldout.config_hash(c)}
    heldout.stamp(result.rows, **info)
    prefix = f'eval/{name}/{stage}'
    writer = MetricWriter(exp.workdir, c.get('wandb'), c.to_dict())
    writer.write(step, {f'{prefix}/{k}': v for k, v in result.metrics.items()})
    for key, values in (('gate_inner', result.gates['inner']), ('gate_outer', result.gates['outer']),
                        ('reasoning_length', result.reasoning_lengths)):
      writer.histogram(step, f'{prefix}/{key}', values)
    writer.table(step, f'{prefix}/completions', [{**r, 'gates': ' '.join(f'{g:.2f}' for g in r['gates'])}
                                                 for r in result.rows[:64]])
    writer.close()
    if jax.process_index() == 0:
      paths = report.write_report(result, heldout.output_dir(exp.workdir, name, stage),
                                  {**info, 'checkpoint': why, 'tau': tau})
      log.info('Evaluation of %s step %d (%s) on %s, %d examples: %s. Reports: %s', stage, step, why, name,
               len(result.rows), result.metrics, os.path.dirname(paths['metrics.json']))
    metrics = result.metrics
  return metrics


def run_coconut_eval(exp: Experiment) -> dict[str, float]:
  """COCONUT / baseline evaluation of the bootstrap checkpoint `config.eval.checkpoint` (best on validation by
  default) at the curriculum stage it was trained at, on the records of `config.eval`; reports (metrics, rows with
  latent lens, gate plot) in `<workdir>/eval/<split or file>/bootstrap/`."""
  c = exp.config
  step, why = stage_checkpoint(exp, 'bootstrap', c.eval.checkpoint)
  graphdef, params = stage_params(exp, 'bootstrap', str(step))
  stage = coconut_batches(exp, exp.train, c.bootstrap.batch_size).stage(max(step - 1, 0))
  name, records = heldout.eval_records(c, exp.valid)
  prompts = data_lib.build_prompts(records, exp.tokenizer, c.data.max_prompt_len)
  gen_cfg = coconut_train.generate_config(c.method, stage, curriculum(c), exp.vocab, c.generate.max_new_tokens,
                                          return_hidden=True)
  metrics, rows = coconut_train.evaluate(nnx.merge(graphdef, params), prompts, exp.tokenizer, c.dataset.name,
                                         gen_cfg, c.generate.batch_size, exp.mesh, c.coconut.answer_match)
  info = {'method': c.method, 'stage': 'bootstrap', 'step': step, 'split': name, 'config': heldout.config_hash(c)}
  heldout.stamp(rows, **info)
  metrics = {**info, 'checkpoint': why, 'curriculum_stage': stage, 'answer_match': c.coconut.answer_match,
             'num_examples': len(rows), **metrics}
  if jax.process_index() == 0:
    out = heldout.output_dir(exp.workdir, name, 'bootstrap')
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
      json.dump(metrics, f, indent=2)
    with open(os.path.join(out, 'completions.jsonl'), 'w') as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
    if any(r['latent_lens'] for r in rows):
      report.plot_gates_over_tokens(rows, os.path.join(out, 'gates_over_tokens.png'))
    log.info('Evaluation of %s at step %d (%s), curriculum stage %d, on %s (%d examples): %s. Reports: %s',
             c.method, step, why, stage, name, len(rows), metrics, out)
  return metrics


def run(config, workdir: str) -> None:
  with workdir_lib.hold(workdir):
    _run(config, workdir)


def _run(config, workdir: str) -> None:
  exp = setup(config, workdir)
  if config.method == 'think_tokens':
    from dtt_jax import think_tokens  # pylint: disable=g-import-not-at-top
    think_tokens.run(exp)
    return
  stage = config.stage
  if stage in ('bootstrap', 'pipeline'):
    result = run_bootstrap(exp)
    log.info('bootstrap finished at step %d: %s', result.step, result.last_validation)
    if result.interrupted:
      return
  if stage in ('grpo', 'pipeline') and not is_coconut(config):
    result = run_grpo(exp)
    log.info('grpo finished at step %d: %s', result.step, result.last_validation)
    if result.interrupted:
      return
  if stage in ('eval', 'pipeline'):
    run_eval(exp)
  if jax.process_index() == 0:
    summary.write_summary(workdir)  # accuracy, tokens and gates per stage; eval/training_curves.png
