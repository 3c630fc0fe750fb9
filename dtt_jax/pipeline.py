"""The run `main` starts: setup (config checks, data, tokenizer, vocabulary, mesh), then the stages of
`config.method` (`methods/`) that `config.stage` selects, its evaluation, and the summary.

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

import logging
import os

import jax
import ml_collections

from dtt_jax import data as data_lib
from dtt_jax import dry_run, methods, parallel, tokens
from dtt_jax import workdir as workdir_lib
from dtt_jax.data import answers
from dtt_jax.eval import heldout
from dtt_jax.eval import summary
from dtt_jax.methods.base import Experiment
from dtt_jax.model import FAMILIES, configured_family, hf_io, lora, precision
from dtt_jax.model import dtt as dtt_lib
from dtt_jax.train import state as state_lib

log = logging.getLogger(__name__)

STAGES = ('bootstrap', 'grpo', 'eval', 'pipeline')
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
  method = methods.get(c.method)  # raises naming the registered methods
  if not method.stages_to_train(c.stage) and c.stage != 'eval':
    raise ValueError(f'config.stage="{c.stage}" does not apply to config.method={c.method!r}, whose only trained '
                     f'stage is {method.stages[0]!r}: use "bootstrap", "eval" or "pipeline".')
  if c.model.get('dropout', 0.0) and not method.uses_dropout:
    dropout_methods = ', '.join(name for name, m in methods.REGISTRY.items() if m.uses_dropout)
    raise ValueError(f'config.model.dropout={c.model.dropout} applies only to the methods with a supervised stage '
                     f'({dropout_methods}): set it to 0 for config.method={c.method!r}.')
  expect('bootstrap.schedule', c.bootstrap.schedule, state_lib.SCHEDULES)
  expect('bootstrap.decay', c.bootstrap.decay, state_lib.DECAYS)
  expect('eval.answer_match', c.eval.answer_match, answers.MATCHES)
  expect('dataset.name', c.dataset.name, data_lib.DATASETS)
  expect('model.vocab', c.model.vocab, ('compact', 'full'))
  expect('model.family', c.model.get('family', 'gpt2'), FAMILIES)  # runs from before the key: GPT-2
  if c.model.init == 'scratch' and c.model.get('family', 'gpt2') != 'gpt2':
    _check_llama_sizes(c.model)
  expect('data.span', c.data.span, ('none', 'cot', 'curriculum'))
  if c.model.vocab == 'compact' and c.model.init != 'scratch':
    raise ValueError('config.model.vocab="compact" only works with config.model.init="scratch" (a pretrained model '
                     'keeps its full vocabulary).')
  for key in ('bootstrap.batch_size', 'bootstrap.microbatches', 'generate.batch_size'):
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
  precision(c.model)  # raises naming config.model.dtype / param_dtype
  method.check_config(c)  # the method's own keys, after the shared ones


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


def _tokenizer_source(c) -> str:
  return hf_io.tokenizer_source(c.model, SHARED_TOKENIZER)  # a Llama / Qwen2 checkpoint's own, else GPT-2's


def setup(config, workdir: str) -> Experiment:
  """Data, tokenizer and vocabulary (the compact map is fixed at the first run and reused on resume)."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.check_resume(config, workdir, methods.get(config.method))  # before anything in the workdir changes
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
    layouts = methods.get(config.method).vocab_texts(config, train + valid)
    vocab = data_lib.compact_vocab(train + valid + _generated_test_records(config, valid), hf, extra_texts=layouts)
  if jax.process_index() == 0:
    with open(vocab_path, 'w') as f:
      f.write(vocab.to_json())
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = parallel.make_mesh(config.num_devices or None, config.get('parallel', {}).get('fsdp', 1))
  log.info('%s: %d train / %d valid records, vocabulary %d tokens (%d rows), %d devices (data %d x fsdp %d).',
           config.dataset.name, len(train), len(valid), vocab.num_tokens, vocab.num_rows, parallel.num_shards(mesh),
           mesh.shape['data'], mesh.shape['fsdp'])
  return Experiment(config, workdir, mesh, tokens.Tokenizer(hf, vocab), train, valid)


def open_workdir(workdir: str) -> Experiment:
  """The Experiment of a trained workdir on one device, read only (nothing written, no lock): the config of its last
  run, its vocabulary, tokenizer and data splits (a method may need the train split, e.g. COCONUT's curriculum stage
  at a checkpoint's step). For the tools that use a trained model: export, generate."""
  config = workdir_lib.load_run_config(workdir)
  config.num_devices = 1
  config.parallel = ml_collections.ConfigDict({'fsdp': 1})  # one device: nothing to shard
  check_config(config)
  vocab_path = os.path.join(workdir, 'vocab.json')
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f'{vocab_path} is missing: {workdir} has no trained model (run dtt_jax.main first).')
  with open(vocab_path) as f:
    vocab = tokens.Vocab.from_json(f.read())
  hf = tokens.load_tokenizer(_tokenizer_source(config))
  train, valid = data_lib.load_splits(config.dataset, seed=config.seed)
  return Experiment(config, workdir, parallel.make_mesh(1, 1), tokens.Tokenizer(hf, vocab), train, valid)


def _generated_test_records(config, valid: list[dict]) -> list[dict]:
  """The test records `config.eval` reads, for a generated dataset evaluated on its test split: their tokens join the
  compact vocabulary (which tokens exist, not their answers), so a small train split still covers every question."""
  if config.dataset.name in data_lib.GENERATED and config.eval.split == 'test' and not config.eval.path:
    return heldout.eval_records(config, valid)[1]
  return []


def run(config, workdir: str) -> bool:
  """Runs `config.stage` in `workdir`; False when a signal interrupted training (its checkpoint written, the later
  stages and the evaluation not run), else True."""
  if config.get('dry_run'):  # nothing in the workdir changes
    check_config(config)
    print(dry_run.report(config), flush=True)
    return True
  with workdir_lib.hold(workdir):
    return _run(config, workdir)


def _run(config, workdir: str) -> bool:
  exp = setup(config, workdir)
  method = methods.get(config.method)
  for stage in method.stages_to_train(config.stage):
    result = method.train(exp, stage)
    log.info('%s finished at step %d: %s', stage, result.step, result.last_validation)
    if result.interrupted:
      return False
  if config.stage in ('eval', 'pipeline'):
    method.evaluate(exp)
  if jax.process_index() == 0:
    summary.write_summary(workdir)  # accuracy, tokens and gates per stage; eval/training_curves.png
  return True
