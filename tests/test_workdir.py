"""A workdir never loses a run, driven through the real CLI: a changed config stops before any compute (or moves
the old stage aside when asked), a corrupt checkpoint is moved aside, a workdir in use is refused and a dead
holder's lock taken over, and GRPO / evaluation interrupted anywhere (kill -9, SIGTERM, a full disk) rerun to the
same result."""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from configs import base
from dtt_jax import methods
from dtt_jax import workdir as workdir_lib
from tests.conftest import PROJECT_ROOT
from tests.test_main import _cmd, _env, _final_state, _metric_lines, _run, _wait_for

BOOT = ('--config.bootstrap.steps=4', '--config.bootstrap.eval_every=2', '--config.bootstrap.checkpoint_every=2')
GRPO = ('--config.grpo.steps=4', '--config.grpo.prompts_per_step=2', '--config.grpo.num_generations=2',
        '--config.grpo.max_new_tokens=10', '--config.grpo.eval_every=0', '--config.grpo.checkpoint_every=2')


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished 4-step bootstrap (checkpoints at 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  _run(workdir, *BOOT)
  return workdir


def _copy(src, tmp_path, name='run'):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def _tree_digest(path) -> str:
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      h.update(os.path.relpath(os.path.join(root, name), path).encode())
      h.update(open(os.path.join(root, name), 'rb').read())
  return h.hexdigest()


def _ckpts(workdir, stage='bootstrap'):
  return sorted(os.listdir(os.path.join(workdir, stage, 'checkpoints')))


def _faulty(workdir, fault, marker, *overrides, stage='bootstrap', devices=1):
  """Popen of the CLI with `fault` injected (tests/cli_faults.py)."""
  cmd = _cmd(workdir, *overrides, stage=stage)
  cmd[1:3] = ['-m', 'tests.cli_faults']
  env = dict(_env(devices), DTT_FAULT=fault, DTT_FAULT_MARKER=str(marker))
  return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_changed_model_stops_at_once_and_move_aside_keeps_the_old_run(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = _tree_digest(workdir)
  proc = _run(workdir, *BOOT, '--config.model.n_embd=64', '--config.bootstrap.steps=8', check=False)
  assert proc.returncode == 1
  assert 'bootstrap (checkpoints at steps 2, 4;' in proc.stderr
  assert 'model.n_embd: 32 (saved) -> 64 (now)' in proc.stderr
  assert 'bootstrap.steps' not in proc.stderr  # harmless: not a reason to stop
  assert '--config.on_config_change=move_aside' in proc.stderr and 'Traceback' not in proc.stderr
  assert _tree_digest(workdir) == before  # nothing written, lock released

  proc = _run(workdir, *BOOT, '--config.model.n_embd=64', '--config.on_config_change=move_aside')
  moved = [d for d in os.listdir(workdir) if d.startswith('moved-')]
  assert len(moved) == 1 and 'moved bootstrap, eval, vocab.json, config.json to' in proc.stderr
  assert _ckpts(os.path.join(workdir, moved[0])) == ['2', '4']  # the old run, whole
  _, state = _final_state(workdir)
  assert state['params']['gpt2']['wte']['embedding'].shape[1] == 64


def test_harmless_change_resumes_and_is_logged(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  proc = _run(workdir, *BOOT, '--config.bootstrap.steps=6', '--config.bootstrap.log_every=2')
  assert 'resuming from step 4 with changed settings that do not change the run' in proc.stderr
  assert 'bootstrap.steps: 4 (saved) -> 6 (now)' in proc.stderr and 'resumed from' in proc.stderr
  assert {'4', '6'} <= set(_ckpts(workdir))


def test_corrupt_checkpoint_is_moved_aside_and_none_readable_stops(finished, tmp_path):
  def corrupt(workdir, step):
    for root, _, files in os.walk(os.path.join(workdir, 'bootstrap', 'checkpoints', str(step), 'state')):
      for name in files:
        open(os.path.join(root, name), 'wb').write(b'garbage')

  workdir = _copy(finished, tmp_path, 'one')
  corrupt(workdir, 4)
  proc = _run(workdir, *BOOT, '--config.bootstrap.steps=6')
  assert 'checkpoints/4 could not be read' in proc.stderr and 'at step 2.' in proc.stderr
  assert [d.split('-')[0] for d in os.listdir(os.path.join(workdir, 'bootstrap', 'checkpoints.corrupt'))] == ['4']
  assert {'4', '6'} <= set(_ckpts(workdir))  # the new step 4, retrained from 2

  workdir = _copy(finished, tmp_path, 'all')
  corrupt(workdir, 2)
  corrupt(workdir, 4)
  checkpoints = os.path.join(workdir, 'bootstrap', 'checkpoints')
  before = _tree_digest(checkpoints)
  proc = _run(workdir, *BOOT, '--config.bootstrap.steps=6', check=False)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert 'can be read; none was changed:\n  4: ' in proc.stderr and '\n  2: ' in proc.stderr
  assert _tree_digest(checkpoints) == before


def test_workdir_in_use_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
  workdir = str(tmp_path / 'run')
  long_run = subprocess.Popen(_cmd(workdir, '--config.bootstrap.steps=100000', '--config.bootstrap.eval_every=0',
                                   '--config.bootstrap.checkpoint_every=100000'),
                              cwd=PROJECT_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
  _wait_for(lambda: len(_metric_lines(workdir)) >= 1, long_run)
  second = _run(workdir, '--config.bootstrap.steps=2', check=False)
  assert second.returncode == 1 and 'Traceback' not in second.stderr
  assert (f'{workdir} is in use by process {long_run.pid} on host {socket.gethostname()} since '
          in second.stderr)
  long_run.send_signal(signal.SIGKILL)
  long_run.wait()
  third = _run(workdir, '--config.bootstrap.steps=2', '--config.bootstrap.eval_every=0')
  assert f'Taking over the lock of {workdir} held by process {long_run.pid}' in third.stderr
  assert 'is no longer running' in third.stderr
  assert not os.path.exists(os.path.join(workdir, 'lock.json'))  # released at the end

  # A holder on another host (shared disk) is judged by its heartbeat.
  lock = os.path.join(workdir, 'lock.json')
  json.dump({'host': 'node-17', 'pid': 4242, 'since': '2026-01-01T00:00:00+00:00', 'command': 'dtt_jax.main'},
            open(lock, 'w'))
  refused = _run(workdir, check=False)
  assert refused.returncode == 1 and 'in use by process 4242 on host node-17 since 2026-01-01' in refused.stderr
  old = time.time() - 3600
  os.utime(lock, (old, old))
  taken = _run(workdir, '--config.data.span=latent', check=False)  # takes the lock, then stops on the config
  assert 'held by process 4242 on host node-17' in taken.stderr and 'no heartbeat for' in taken.stderr
  assert "config.data.span='latent'" in taken.stderr and not os.path.exists(lock)


def test_grpo_interrupted_anywhere_ends_bit_identical(finished, tmp_path):
  """kill -9 and SIGTERM during rollouts, then a full disk at the last checkpoint, then a plain rerun: the
  parameters equal an uninterrupted run's. Both with parameters and optimizer state sharded over 2 devices (FSDP),
  started from a bootstrap trained replicated: checkpoints are saved sharded and restored onto another layout."""
  common = (*GRPO, f'--config.init_from={finished}', '--config.parallel.fsdp=2')
  straight = str(tmp_path / 'straight')
  _run(straight, *common, stage='grpo', devices=2)
  workdir, marker = str(tmp_path / 'run'), tmp_path / 'marker'

  # step 3's rollout, after checkpoint 2
  proc = _faulty(workdir, 'rollout:3:600', marker, *common, stage='grpo', devices=2)
  _wait_for(lambda: marker.exists() and '2' in os.listdir(os.path.join(workdir, 'grpo', 'checkpoints')), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _ckpts(workdir, 'grpo') == ['2']
  marker.unlink()

  proc = _faulty(workdir, 'rollout:1:3', marker, *common, stage='grpo', devices=2)  # resumed at 2: step 3's rollout
  _wait_for(marker.exists, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 143, stderr[-3000:]  # interrupted after its checkpoint
  assert _ckpts(workdir, 'grpo') == ['2', '3']

  proc = _faulty(workdir, 'full_disk:4', marker, *common, stage='grpo', devices=2)
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 1 and 'Writing checkpoint' in stderr.rstrip().splitlines()[-1]  # ours, last
  assert 'checkpoints/4 failed (OSError: [Errno 28] No space left on device). Finished checkpoints, intact: 2, 3.' \
      in stderr
  assert _ckpts(workdir, 'grpo')[:2] == ['2', '3']

  _run(workdir, *common, stage='grpo', devices=2)
  step_a, state_a = _final_state(straight, stage='grpo')
  step_b, state_b = _final_state(workdir, stage='grpo')
  assert step_a == step_b == 4 and _ckpts(workdir, 'grpo') == ['3', '4']
  for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(x, y)


def test_evaluation_interrupted_reruns_to_the_same_report(finished, tmp_path):
  workdir, marker = _copy(finished, tmp_path), tmp_path / 'marker'
  for sig in (signal.SIGTERM, signal.SIGKILL):
    proc = _faulty(workdir, 'eval:600', marker, stage='eval')
    _wait_for(marker.exists, proc)
    proc.send_signal(sig)
    proc.wait()
    assert proc.returncode != 0 and not _eval_reports(workdir)
    marker.unlink()
  _run(workdir, stage='eval')
  reference = _copy(finished, tmp_path, 'reference')
  _run(reference, stage='eval')
  reports = _eval_reports(workdir)
  assert list(reports) == ['test/bootstrap/metrics.json'] and reports == _eval_reports(reference)
  _run(workdir, '--config.eval.checkpoint=2', stage='eval')  # beside the best's report, which stays
  best, reports = reports, _eval_reports(workdir)
  assert sorted(reports) == ['test/bootstrap/metrics.json', 'test@2/bootstrap/metrics.json']
  assert reports['test@2/bootstrap/metrics.json']['step'] == 2
  assert reports['test/bootstrap/metrics.json'] == best['test/bootstrap/metrics.json']


def _eval_reports(workdir) -> dict[str, dict]:
  """{path under eval/: content} of every metrics.json the eval stage wrote."""
  root = os.path.join(workdir, 'eval')
  return {os.path.relpath(os.path.join(d, 'metrics.json'), root): json.load(open(os.path.join(d, 'metrics.json')))
          for d, _, files in sorted(os.walk(root)) if 'metrics.json' in files}


def test_kill_9_while_a_checkpoint_is_written_reruns_to_identical_params(tmp_path):
  common = ('--config.bootstrap.steps=8', '--config.bootstrap.eval_every=0', '--config.bootstrap.checkpoint_every=3')
  straight = str(tmp_path / 'straight')
  _run(straight, *common)
  workdir, marker = str(tmp_path / 'run'), tmp_path / 'marker'
  proc = _faulty(workdir, 'checkpoint:6:600', marker, *common)  # step 6's write stalls before its rename
  _wait_for(marker.exists, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  listing = os.listdir(os.path.join(workdir, 'bootstrap', 'checkpoints'))
  assert '3' in listing and '6' not in listing and any(d.startswith('6.orbax-checkpoint-tmp') for d in listing)
  proc = _run(workdir, *common)
  assert 'resumed from' in proc.stderr and 'at step 3.' in proc.stderr
  assert _ckpts(workdir) == ['6', '8']  # the half-written step 6 cleaned up, then written anew
  _, state_a = _final_state(straight)
  _, state_b = _final_state(workdir)
  for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(x, y)


# A workdir from before these keys existed (#19 item 1 and #17 item 4 added them): its saved config lacks them.
NEWER_KEYS = ('model.family', 'model.n_kv_head', 'model.intermediate_size', 'model.rope_theta',
              'model.tie_word_embeddings', 'data.span_text', 'data.digit_tokens')


def _old_workdir(tmp_path, config) -> str:
  """A workdir whose bootstrap has a checkpoint (step 4) and a saved config without NEWER_KEYS."""
  saved = workdir_lib.config_dict(config)
  for key in NEWER_KEYS:
    section, name = key.split('.')
    del saved[section][name]
  workdir = tmp_path / 'old'
  (workdir / 'bootstrap' / 'checkpoints' / '4').mkdir(parents=True)
  (workdir / 'bootstrap' / 'config.json').write_text(json.dumps(saved))
  return str(workdir)


def test_keys_newer_than_the_workdir_are_no_difference_at_their_defaults(tmp_path):
  """The saved config lacks NEWER_KEYS and this run keeps their defaults: it resumes (the bootstrap it trains) and
  reads the bootstrap (config.stage='grpo': compared on the parameter keys). Without the defaults every one of
  them is a difference, as before the fix."""
  config = base.get_config()
  workdir = _old_workdir(tmp_path, config)
  saved = json.loads(open(os.path.join(workdir, 'bootstrap', 'config.json')).read())
  current = workdir_lib.config_dict(config)
  assert [k for k, _, _ in workdir_lib.differences(saved, current)] == sorted(NEWER_KEYS)
  assert workdir_lib.differences(saved, current, defaults=workdir_lib.default_config()) == []
  workdir_lib.check_resume(config, workdir, methods.get(config.method))
  config.stage = 'grpo'
  workdir_lib.check_resume(config, workdir, methods.get(config.method))


@pytest.mark.parametrize('stage,key,value', [('bootstrap', 'data.span_text', 'answer_digits'),
                                             ('bootstrap', 'model.rope_theta', 5e5),
                                             ('grpo', 'model.family', 'llama')])
def test_a_newer_key_away_from_its_default_still_stops(stage, key, value, tmp_path):
  """A key the saved config lacks, set to another value than its default now, is a difference (the old run
  computed with the default): the resume stops naming it, for the stage the run trains and for the one it reads."""
  config = base.get_config()
  workdir = _old_workdir(tmp_path, config)
  config.stage = stage
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(workdir_lib.WorkdirError, match=re.escape(f"{key}: '(absent)' (saved) -> {value!r} (now)")) as e:
    workdir_lib.check_resume(config, workdir, methods.get(config.method))
  assert sum(k in str(e.value) for k in NEWER_KEYS) == 1  # the others keep their defaults
