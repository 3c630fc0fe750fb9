"""Two processes talking through jax.distributed on localhost train to the same parameters as one process (the DTT
bootstrap, and the thinking-token method's two stages and evaluation)."""

import importlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import PROJECT_ROOT, require_shared, xla_flags
from tests.test_main import TINY, _final_state

STEPS = ('--config.bootstrap.steps=4', '--config.bootstrap.eval_every=2', '--config.bootstrap.checkpoint_every=2')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int):
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS='cpu')
  return env


def _main(workdir, *extra):
  return [sys.executable, '-m', 'dtt_jax.main', '--config=configs/quickstart.py:bootstrap', f'--workdir={workdir}',
          *TINY, *STEPS, *extra]


def test_two_processes_equal_one(tmp_path):
  single = str(tmp_path / 'single')
  proc = subprocess.run(_main(single), cwd=PROJECT_ROOT, env=_env(4), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]

  multi = str(tmp_path / 'multi')
  port = _free_port()
  procs = [subprocess.Popen(_main(multi, f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
                                  f'--process_id={i}'),
                            cwd=PROJECT_ROOT, env=_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  step_a, state_a = _final_state(single)
  step_b, state_b = _final_state(multi, like=state_a)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(state_a['params']), jax.tree.leaves(state_b['params'])):
    np.testing.assert_allclose(x, y, atol=1e-5)


# A tiny thinking-token pipeline (teacher, think, evaluation) on 2 devices: 1 process x 2 or 2 processes x 1.
THINK = {'model.n_layer': 1, 'model.n_embd': 32, 'model.n_head': 2, 'model.n_positions': 64,
         'dataset.train_size': 64, 'dataset.valid_size': 8, 'think.teacher_steps': 2, 'think.steps': 2,
         'think.batch_size': 8, 'think.prompts_per_step': 4, 'think.num_generations': 2, 'think.num_tokens': 4,
         'think.real_tokens': 2, 'think.max_think': 2, 'think.eval_size': 8, 'think.eval_every': 0,
         'think.log_every': 1, 'think.warmup_steps': 1, 'generate.batch_size': 8}  # warmup 1: step 2 at full lr


def test_think_tokens_two_processes_equal_one(tmp_path):
  """The data split by process, the evaluation gathered on every process and the report of process 0 give the
  teacher, the thinking policy and the evaluation of one process."""
  require_shared('gpt2_tokenizer')
  from dtt_jax import pipeline  # pylint: disable=g-import-not-at-top
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  port = _free_port()
  flags = [f'--config.{k}={v}' for k, v in THINK.items()]
  procs = [subprocess.Popen([sys.executable, '-m', 'dtt_jax.main', '--config=configs/think_tokens.py',
                             f'--workdir={multi}', *flags, f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
                             f'--process_id={i}'],
                            cwd=PROJECT_ROOT, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  try:
    config = importlib.import_module('configs.think_tokens').get_config()
    for key, value in THINK.items():
      section, name = key.split('.')
      config[section][name] = value
    config.num_devices = 2  # of this process's 4 (conftest.py)
    pipeline.run(config, single)  # meanwhile, in this process
    for p in procs:
      _, err = p.communicate(timeout=900)
      assert p.returncode == 0, err[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for stage in ('teacher', 'think'):
    step_a, state_a = _final_state(single, stage=stage)
    step_b, state_b = _final_state(multi, like=state_a, stage=stage)
    assert step_a == step_b == 2
    for x, y in zip(jax.tree.leaves(state_a['params']), jax.tree.leaves(state_b['params'])):
      np.testing.assert_allclose(x, y, atol=1e-5)
  report = lambda workdir: json.loads((pathlib.Path(workdir) / 'eval' / 'valid' / 'think' / 'metrics.json').read_text())
  metrics_a, metrics_b = report(single), report(multi)
  assert metrics_a['think_counts'] == metrics_b['think_counts'] and metrics_a['num_sequences'] == 8
  # the default mode end to end (tests/test_think_tokens.py runs 'next_token')
  assert metrics_a['mode'] == 'teacher' and metrics_a['K'] == 4 and len(metrics_a['think_counts']) == 4
  assert sum(metrics_a['think_counts']) == round(metrics_a['think_per_token'] * metrics_a['num_scored_tokens'])
  assert 0.0 <= metrics_a['think_frequency'] < 1.0
  assert min(metrics_a[k] for k in ('loss_teacher', 'loss_no_think', 'loss_think', 'answer_loss_think')) > 0
  out = pathlib.Path(single) / 'eval' / 'valid' / 'think'
  assert (out / 'think_histogram.png').stat().st_size > 0 and (out / 'samples.jsonl').read_text()
  for key in ('loss_teacher', 'loss_no_think', 'loss_think', 'think_frequency'):
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-5)
