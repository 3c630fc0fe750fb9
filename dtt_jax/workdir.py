"""What keeps a workdir's runs safe: one holder at a time, and a resume check before any compute.

* Lock: `<workdir>/lock.json` names its holder (host, pid, since, command) and is created atomically (O_EXCL).
  A second run fails at once naming the holder. A lock whose holder is gone (same host: the pid no longer runs;
  another host: no heartbeat for `STALE_AFTER_S`) is taken over with a warning. The holder touches the file every
  `HEARTBEAT_S`. A multi-process job (jax.distributed) is one holder: process 0 takes the lock for all.
* Resume check: each training stage records its config in `<workdir>/<stage>/config.json` when it starts fresh.
  A run whose config differs from a stage that already has checkpoints stops before any compute, listing each key
  with both values, unless every difference is harmless (`HARMLESS`: steps, intervals, logging), which is logged.
  Stages the run only reads (a finished bootstrap under GRPO or eval) are compared on the keys that fix the
  parameters (`PARAM_KEYS`). `config.on_config_change='move_aside'` moves the differing stages (and those trained
  from them) to `<workdir>/moved-<time>/` and starts them anew; nothing is ever deleted.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

LOCK_FILE = 'lock.json'
HEARTBEAT_S = 15.0
STALE_AFTER_S = 300.0
CONFIG_FILE = 'config.json'
# Keys whose change does not change what a resumed run computes up to its current step.
HARMLESS = ('stage', 'num_devices', 'parallel.*', 'on_config_change', 'wandb.*', '*.steps', '*.teacher_steps',
            '*.eval_every', '*.checkpoint_every', '*.log_every', '*.keep_checkpoints', 'generate.batch_size')
# Keys that fix the parameters a later stage reads from an earlier one (shapes, layout, the method that made them).
PARAM_KEYS = ('model.*', 'lora.*', 'think.num_tokens')
PARAM_HARMLESS = ('model.dtype',)  # reading a stage's parameters at another compute precision is allowed
STAGE_SECTIONS = ('bootstrap', 'grpo', 'think')  # config sections of one stage: another stage's are ignored


class WorkdirError(RuntimeError):
  """A run that must not start or go on in this workdir; the message says how to go on."""


# ------------------------------------------------------------------------------------------------------------ lock


def _process_start(pid: int) -> str | None:
  """Start time of `pid` (Linux /proc, clock ticks since boot): tells a live holder from a reused pid."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _holder_alive(path: str, holder: dict) -> tuple[bool, str]:
  """(alive, why not) for the holder recorded in the lock file at `path`."""
  if holder.get('host') == socket.gethostname() and 'pid' in holder:
    pid = int(holder['pid'])
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False, f'process {pid} is no longer running'
    except PermissionError:
      pass  # another user's live process
    started = _process_start(pid)
    if started is not None and holder.get('pid_start') not in (None, started):
      return False, f'process {pid} is no longer running (the pid now belongs to another process)'
    return True, ''
  age = time.time() - os.path.getmtime(path)
  if age > STALE_AFTER_S:
    return False, f'no heartbeat for {age:.0f} s (more than {STALE_AFTER_S:.0f} s)'
  return True, ''


class _Lock:
  """The held lock file, kept fresh by a heartbeat thread until `release`."""

  def __init__(self, path: str, record: dict):
    self.path, self.record = path, record
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name='workdir-lock-heartbeat', daemon=True)
    self._thread.start()

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self):
    self._stop.set()
    with contextlib.suppress(OSError, ValueError):
      with open(self.path) as f:
        if json.load(f).get('token') == self.record['token']:
          os.unlink(self.path)


def _acquire(workdir: str) -> _Lock:
  path = os.path.join(workdir, LOCK_FILE)
  record = {'host': socket.gethostname(), 'pid': os.getpid(), 'pid_start': _process_start(os.getpid()),
            'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'command': ' '.join(sys.argv), 'token': f'{socket.gethostname()}:{os.getpid()}:{time.time_ns()}'}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}  # being written right now, or damaged: judged by its age
      with contextlib.suppress(FileNotFoundError):
        alive, why = _holder_alive(path, holder)
        if alive:
          raise WorkdirError(
              f'{workdir} is in use by process {holder.get("pid", "?")} on host {holder.get("host", "?")} since '
              f'{holder.get("since", "?")} ({holder.get("command", "?")}). Wait for it to end or stop it, or use '
              f'another --workdir. (Lock file: {path}.)')
        log.warning('Taking over the lock of %s held by process %s on host %s since %s: %s.', workdir,
                    holder.get('pid', '?'), holder.get('host', '?'), holder.get('since', '?'), why)
        os.unlink(path)
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump(record, f, indent=2)
    return _Lock(path, record)
  raise WorkdirError(f'Could not lock {workdir}: other runs keep taking {path}. Use another --workdir.')


@contextlib.contextmanager
def hold(workdir: str):
  """Holds `<workdir>/lock.json` for the duration of the block (process 0 for a multi-process job)."""
  os.makedirs(workdir, exist_ok=True)
  lock, error = None, ''
  if jax.process_index() == 0:
    try:
      lock = _acquire(workdir)
    except WorkdirError as e:
      error = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if not int(multihost_utils.broadcast_one_to_all(np.int32(not error))) and not error:
      error = f'{workdir} is in use by another run (process 0 says which).'
  if error:
    raise WorkdirError(error)
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


# --------------------------------------------------------------------------------------------------- resume check


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _matches(key: str, patterns) -> bool:
  return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def differences(saved: dict, current: dict, only=None, ignore=(), defaults: dict | None = None
                ) -> list[tuple[str, Any, Any]]:
  """[(key, saved value, current value)] over flattened configs; `only` / `ignore`: key patterns.

  defaults (a config as `config_dict` gives it, e.g. `default_config()`): a key the saved config lacks (it was
  written before the key existed, when the code behaved as its default) counts as unchanged when the current value
  is its default; absent from `defaults`, or another value, it is a difference as before."""
  old, new, default = flatten(saved), flatten(current), flatten(defaults or {})
  missing = object()
  out = []
  for key in sorted(set(old) | set(new)):
    if (only is not None and not _matches(key, only)) or _matches(key, ignore):
      continue
    a, b = old.get(key, missing), new.get(key, missing)
    if a is missing and b is not missing and default.get(key, missing) == b:
      continue
    if a != b:
      out.append((key, '(absent)' if a is missing else a, '(absent)' if b is missing else b))
  return out


def config_dict(config) -> dict:
  """The config as the JSON files hold it (tuples as lists)."""
  return json.loads(config.to_json_best_effort())


def default_config() -> dict:
  """`configs/base.get_config()` as `config_dict` gives it: the value of each key in runs from before it existed."""
  from configs import base  # pylint: disable=g-import-not-at-top  (the project root, as every config file needs)
  return config_dict(base.get_config())


def load_run_config(workdir: str):
  """The ml_collections config a run in `workdir` was configured with (its `config.json`), keys it lacks (added to
  configs/base.py after the run) at their defaults."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: {workdir} is not a dtt_jax workdir (run dtt_jax.main first).')
  with open(path) as f:
    saved = json.load(f)

  def merge(default, value):
    if isinstance(default, dict) and isinstance(value, dict):
      return {**default, **{k: merge(default.get(k), v) for k, v in value.items()}}
    return value
  return ml_collections.ConfigDict(merge(config_dict(base.get_config()), saved))


def checkpoint_steps(stage_dir: str) -> list[int]:
  """Finished checkpoint steps in `<stage_dir>/checkpoints` (Orbax renames a step's folder to its number last)."""
  ckpt = os.path.join(stage_dir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _saved_config(workdir: str, stage: str) -> tuple[dict | None, str]:
  for path in (os.path.join(workdir, stage, CONFIG_FILE), os.path.join(workdir, CONFIG_FILE)):
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f), path
  return None, ''


def _other_sections(method, stage: str) -> tuple[str, ...]:
  """Config sections a stage does not use (another stage's own section): ignored when it resumes."""
  own = method.config_sections(stage)
  return tuple(f'{other}.*' for other in STAGE_SECTIONS if other not in own)


def _format(diffs) -> str:
  return '\n'.join(f'  {key}: {a!r} (saved) -> {b!r} (now)' for key, a, b in diffs)


def check_resume(config, workdir: str, method, defaults: dict | None = None) -> None:
  """Before any compute: stops (WorkdirError) when this run's config differs meaningfully from the run whose
  checkpoints it would resume or read; logs harmless differences; with `config.on_config_change='move_aside'`,
  moves the differing stages (and the stages after them) to `<workdir>/moved-<time>/` instead. `method`: the
  `methods.base.Method` of `config.method` (its stages and their config sections).

  A key that a saved config lacks (a workdir from before the key existed) is no difference when this run keeps
  its default: `defaults` (default: `default_config()`, configs/base.py)."""
  on_change = config.get('on_config_change', 'stop')
  if on_change not in ('stop', 'move_aside'):
    raise ValueError(f"config.on_config_change={on_change!r}: expected one of 'stop', 'move_aside'.")
  current = config_dict(config)
  defaults = default_config() if defaults is None else defaults
  stages, trained = method.stages, method.stages_to_train(config.stage)
  conflicts = {}  # stage -> (saved config path, differences)
  for stage in stages:
    stage_dir = os.path.join(workdir, stage)
    steps = checkpoint_steps(stage_dir)
    if not steps:
      continue
    saved, path = _saved_config(workdir, stage)
    if saved is None:
      log.warning('%s has checkpoints but no saved config: the run cannot be compared with this one.', stage_dir)
      continue
    if stage in trained:
      ignore = _other_sections(method, stage)
      harmful = differences(saved, current, ignore=ignore + HARMLESS, defaults=defaults)
      harmless = differences(saved, current, only=HARMLESS, ignore=ignore + ('stage',), defaults=defaults)
      if harmless and not harmful:
        log.info('%s: resuming from step %d with changed settings that do not change the run:\n%s', stage,
                 steps[-1], _format(harmless))
    else:
      harmful = differences(saved, current, only=PARAM_KEYS, ignore=PARAM_HARMLESS, defaults=defaults)
    if harmful:
      conflicts[stage] = (path, steps, harmful)
  if not conflicts:
    return
  if on_change == 'move_aside':
    first = stages.index(next(iter(conflicts)))
    _move_aside(workdir, stages[first:], with_vocab=first == 0)
    return
  parts = [f'This config differs from the run already in {workdir}; nothing was changed there.']
  for stage, (path, steps, diffs) in conflicts.items():
    parts.append(f'{stage} (checkpoints at steps {", ".join(map(str, steps))}; config {path}):\n{_format(diffs)}')
  parts.append('To keep that run and start a new one, use another --workdir. To move the old stage(s) aside to '
               f'{workdir}/moved-<time>/ and start anew here, add --config.on_config_change=move_aside.')
  raise WorkdirError('\n'.join(parts))


def _move_aside(workdir: str, stages, with_vocab: bool) -> None:
  """Moves `stages` and the evaluation outputs made from them (with the first stage, also the workdir's
  vocabulary and config, which it fixed) to a dated folder."""
  dest = os.path.join(workdir, 'moved-' + datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
  os.makedirs(dest)
  names = list(stages) + ['eval'] + (['vocab.json', CONFIG_FILE] if with_vocab else [])
  for name in names:
    if os.path.exists(os.path.join(workdir, name)):
      os.rename(os.path.join(workdir, name), os.path.join(dest, name))
  log.warning('config.on_config_change=move_aside: moved %s to %s; those stages start anew.',
              ', '.join(n for n in names if os.path.exists(os.path.join(dest, n))), dest)


def record_stage_config(workdir: str, stage: str, config) -> None:
  """Writes `<workdir>/<stage>/config.json` (atomically) when the stage has no checkpoint yet."""
  stage_dir = os.path.join(workdir, stage)
  if jax.process_index() != 0 or checkpoint_steps(stage_dir):
    return
  os.makedirs(stage_dir, exist_ok=True)
  write_atomic(os.path.join(stage_dir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file renamed over it: a reader sees the old file or the new one."""
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
