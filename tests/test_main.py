"""The real entry point under failure: SIGTERM, config errors (kill -9 and the other interruptions:
tests/test_workdir.py; the pipeline's outputs end to end: tests/test_quickstart.py)."""

import os
import signal
import subprocess
import sys
import time

import jax

from tests.conftest import PROJECT_ROOT, xla_flags

TINY = [
    '--config.model.n_layer=1', '--config.model.n_embd=32', '--config.model.n_head=2',
    '--config.dataset.train_size=300', '--config.dataset.valid_size=16', '--config.dataset.max_digits=2',
    '--config.data.max_completion_len=12', '--config.generate.max_new_tokens=10', '--config.generate.batch_size=16',
    '--config.bootstrap.batch_size=8', '--config.bootstrap.log_every=1', '--config.eval.size=16',
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


def _env(devices: int = 1):
  env = dict(os.environ, WANDB_SILENT='true', WANDB_MODE='offline')
  env['XLA_FLAGS'] = xla_flags(devices)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


def _run(workdir, *overrides, stage='bootstrap', check=True, devices=1):
  proc = subprocess.run(_cmd(workdir, *overrides, stage=stage), cwd=PROJECT_ROOT, env=_env(devices),
                        capture_output=True, text=True, timeout=900)
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


def test_sigterm_writes_a_checkpoint_and_exits_as_interrupted(tmp_path):
  """The step finishes, a checkpoint is written, and the exit code (143) tells an interrupted run from a finished
  one, which `dtt_jax.eval.study` and schedulers rely on to rerun it."""
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen(_cmd(workdir, '--config.bootstrap.steps=100000', '--config.bootstrap.eval_every=0',
                               '--config.bootstrap.checkpoint_every=100000'),
                          cwd=PROJECT_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: len(_metric_lines(workdir)) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 143, stderr[-3000:]  # main.INTERRUPTED_EXIT
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
