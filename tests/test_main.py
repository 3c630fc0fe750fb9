"""The real entry point, end to end and under failure: pipeline outputs, SIGTERM, config errors (kill -9 and the
other interruptions: tests/test_workdir.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from tests.conftest import PROJECT_ROOT

TINY = [
    '--config.model.n_layer=1', '--config.model.n_embd=32', '--config.model.n_head=2',
    '--config.dataset.train_size=300', '--config.dataset.valid_size=16', '--config.dataset.max_digits=2',
    '--config.data.max_completion_len=12', '--config.generate.max_new_tokens=10', '--config.generate.batch_size=16',
    '--config.bootstrap.batch_size=8', '--config.bootstrap.log_every=1',
]


def _cmd(workdir, *overrides, stage='bootstrap'):
  return [sys.executable, '-m', 'dtt_jax.main', f'--config=configs/quickstart.py:{stage}', f'--workdir={workdir}',
          *TINY, *overrides]


def _has_wandb() -> bool:
  try:
    import wandb  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def _env():
  env = dict(os.environ, WANDB_SILENT='true', WANDB_MODE='offline')
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


def _run(workdir, *overrides, stage='bootstrap', check=True):
  proc = subprocess.run(_cmd(workdir, *overrides, stage=stage), cwd=PROJECT_ROOT, env=_env(), capture_output=True,
                        text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f'exit {proc.returncode}\n{proc.stderr[-4000:]}')
  return proc


def _final_state(workdir, like=None, stage='bootstrap'):
  """(step, state) of the newest checkpoint; `like`: a state of the same structure, for checkpoints written with
  another device topology (restored onto this process's first device)."""
  from dtt_jax.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = Checkpointer(os.path.join(workdir, stage, 'checkpoints'), async_save=False)
  step = ckpt.steps()[-1]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = None if like is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  ckpt.close()
  return step, restored.state


def _wait_for(predicate, proc, timeout=600):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'process ended early with {proc.returncode}: {proc.stderr.read()[-3000:]}')
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError('timed out')
    time.sleep(0.2)


def _metric_lines(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return open(path).read().splitlines() if os.path.exists(path) else []


def test_pipeline_end_to_end_writes_reports_and_exports(tmp_path):
  workdir = str(tmp_path / 'run')
  _run(workdir, '--config.bootstrap.steps=6', '--config.bootstrap.eval_every=3', '--config.grpo.steps=2',
       '--config.grpo.prompts_per_step=2', '--config.grpo.num_generations=2', '--config.grpo.max_new_tokens=10',
       '--config.grpo.eval_every=2', *(('--config.wandb.enabled=true',) if _has_wandb() else ()), stage='pipeline')
  for stage in ('bootstrap', 'grpo'):  # each trained stage, on the validation split (config.eval)
    out_dir = os.path.join(workdir, 'eval', 'valid', stage)
    metrics = json.load(open(os.path.join(out_dir, 'metrics.json')))
    for key in ('accuracy', 'structure_rate', 'reasoning_tokens', 'reward_structure', 'reward_correctness',
                'reward_efficiency', 'reward_gate', 'gate_inner_mean', 'gate_outer_std', 'gate_outer_max'):
      assert key in metrics
    assert metrics['stage'] == stage and metrics['num_examples'] == 16 and metrics['split'] == 'valid'
    assert metrics['step'] == (6 if stage == 'bootstrap' else 2) or 'best by' in metrics['checkpoint']
    rows = [json.loads(line) for line in open(os.path.join(out_dir, 'completions.jsonl'))]
    assert len(rows) == 16 and {'id', 'question', 'completion', 'correct', 'generated_tokens', 'reasoning_tokens',
                                'gates', 'tokens', 'latent_lens', 'stage', 'step', 'config'} <= set(rows[0])
    assert rows[0]['stage'] == stage and len(rows[0]['tokens']) == len(rows[0]['gates'])
    for name in ('completions.csv', 'gate_histogram.png', 'reasoning_lengths.png', 'gates_over_tokens.png'):
      assert os.path.getsize(os.path.join(out_dir, name)) > 0
  logged = [json.loads(line) for line in _metric_lines(workdir)]
  assert any('bootstrap/loss' in r for r in logged) and any('grpo/valid/reward' in r for r in logged)
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  if _has_wandb():  # offline run directory with the logged history
    assert any(d.startswith('offline-run-') for d in os.listdir(os.path.join(workdir, 'wandb')))

  out = str(tmp_path / 'hf')
  proc = subprocess.run([sys.executable, '-m', 'dtt_jax.export', f'--workdir={workdir}', f'--out={out}'],
                        cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {'config.json', 'model.safetensors', 'dtt_head.safetensors', 'dtt_vocab.json'} <= set(os.listdir(out))
  transformers = pytest.importorskip('transformers')
  model = transformers.GPT2LMHeadModel.from_pretrained(out)
  assert model.config.vocab_size == len(json.load(open(os.path.join(out, 'dtt_vocab.json')))['gpt2_ids'])


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen(_cmd(workdir, '--config.bootstrap.steps=100000', '--config.bootstrap.eval_every=0',
                               '--config.bootstrap.checkpoint_every=100000'),
                          cwd=PROJECT_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: len(_metric_lines(workdir)) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'Received signal 15' in stderr
  steps = [int(s) for s in os.listdir(os.path.join(workdir, 'bootstrap', 'checkpoints')) if s.isdigit()]
  assert len(steps) == 1 and 2 <= steps[0] < 100000


def test_mistyped_config_key_is_named(tmp_path):
  proc = _run(str(tmp_path), '--config.bootstrap.stepz=5', check=False)
  assert proc.returncode != 0
  assert 'stepz' in proc.stderr


def test_bad_config_value_is_named(tmp_path):
  proc = _run(str(tmp_path), '--config.data.span=latent', check=False)
  assert proc.returncode != 0
  assert "config.data.span='latent': expected one of 'none', 'cot'" in proc.stderr


def test_missing_dataset_file_is_named(tmp_path):
  missing = str(tmp_path / 'nowhere' / 'train.jsonl')
  proc = _run(str(tmp_path / 'run'), '--config.dataset.name=gsm8k', f'--config.dataset.train_path={missing}',
              check=False)
  assert proc.returncode != 0
  assert missing in proc.stderr
