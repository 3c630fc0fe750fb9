"""Two processes talking through jax.distributed on localhost train to the same parameters as one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import PROJECT_ROOT
from tests.test_main import TINY, _final_state

STEPS = ('--config.bootstrap.steps=4', '--config.bootstrap.eval_every=2', '--config.bootstrap.checkpoint_every=2')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')
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
