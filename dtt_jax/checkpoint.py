"""Orbax checkpoints of a training stage: array state + JSON metadata, latest k and the best kept, atomic, async.

Layout: `<dir>/<step>/state` (params, optimizer state, step, RNG key data: a pytree of arrays) and
`<dir>/<step>/meta` (JSON: data-iterator position, temperature state, config, vocabulary, validation metrics).
Promises:
* Orbax writes each step into a temporary directory and renames it when complete, so a crash never leaves a
  half-written checkpoint that looks finished (left-over temporary directories are removed at the next start).
* A checkpoint whose arrays have other shapes than the state asked for belongs to another run: `restore_latest`
  raises `IncompatibleCheckpointError` naming them, and touches nothing.
* A checkpoint that cannot be read (corrupted) is reported and moved to `<dir>.corrupt/` (out of reach of the
  keep-latest policy), and the newest good one is used. When none restores, `CheckpointError` lists them all and
  nothing is moved.
* A failed write (a full disk) raises `CheckpointWriteError` naming the finished checkpoints, which stay intact.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No checkpoint of a stage can be used; the message says which and why."""


class IncompatibleCheckpointError(CheckpointError):
  pass


class CheckpointWriteError(CheckpointError):
  pass


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def shape_differences(saved_tree, abstract_tree) -> list[str]:
  """'name: saved shape -> wanted shape' for every array that is missing, extra or shaped differently."""
  saved = {_path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
  wanted = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]}
  out = []
  for name in sorted(set(saved) | set(wanted)):
    if saved.get(name) != wanted.get(name):
      out.append(f'{name}: {saved.get(name, "absent")} saved, {wanted.get(name, "absent")} now')
  return out


class Checkpointer:
  """Save/restore (state pytree, meta dict) by step. Keeps the latest `keep` and the best by `best_metric`."""

  def __init__(self, directory: str, keep: int = 3, best_metric: str | None = None, best_mode: str = 'max',
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(keep)]
    if best_metric:
      policies.append(checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == 'min',
                                                n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode,
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))
    self._writing = None  # step of the save in flight

  def _write_error(self, error: Exception) -> CheckpointWriteError:
    done = sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())
    return CheckpointWriteError(
        f'Writing checkpoint {self.directory}/{self._writing} failed ({type(error).__name__}: {error}). Finished '
        f'checkpoints, intact: {", ".join(map(str, done)) if done else "none"}. Fix the cause (e.g. free disk '
        'space) and rerun the same command: it resumes from the newest of them.')

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None, force: bool = False) -> None:
    """Starts an (async) save; `metrics` (floats) rank the checkpoint for the best-k policy."""
    try:
      self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)),
                        metrics=metrics if (metrics and self.best_metric in metrics) else None, force=force)
    except OSError as e:  # the previous async save failed (reported now), or this one could not start
      raise self._write_error(e) from e
    self._writing = int(step)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def check_shapes(self, step: int, abstract_tree: Any, partial: bool = False) -> None:
    """Raises IncompatibleCheckpointError when `<step>` holds arrays shaped unlike `abstract_tree` (with
    `partial`, only the arrays of `abstract_tree` are compared). Unreadable metadata raises other errors."""
    saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory, str(step), 'state')).tree
    if partial:
      saved = {k: saved[k] for k in abstract_tree if k in saved}
    diffs = shape_differences(saved, abstract_tree)
    if diffs:
      more = f'\n  ... and {len(diffs) - 6} more' if len(diffs) > 6 else ''
      raise IncompatibleCheckpointError(
          f'Checkpoint {self.directory}/{step} holds arrays of other shapes than this config builds; it belongs to '
          'another run:\n  ' + '\n  '.join(diffs[:6]) + more + '\nUse another --workdir, or add '
          '--config.on_config_change=move_aside to move the old stage aside and start anew.')

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the `params` of a saved state: what a later stage, an evaluation or an export needs. It does not
    depend on the optimizer's state layout, so it reads checkpoints of any optimizer configuration."""
    item = {'params': abstract_params}
    self.check_shapes(step, item, partial=True)
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args)).state['params']

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Newest checkpoint that restores; unreadable newer ones are moved aside with a warning. None when there is
    no checkpoint; CheckpointError when none restores."""
    self.wait()
    failed = []
    for step in reversed(self.steps()):
      try:
        self.check_shapes(step, abstract_state)
        state, meta = self.restore(step, abstract_state)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # any unreadable checkpoint: fall back
        log.warning('Checkpoint %s/%d could not be read (%s: %s); trying the previous one.', self.directory, step,
                    type(e).__name__, str(e)[:300])
        failed.append((step, f'{type(e).__name__}: {str(e)[:200]}'))
        continue
      for bad, _ in failed:
        self._move_aside(bad)
      return step, state, meta
    if failed:
      raise CheckpointError(f'No checkpoint in {self.directory} can be read; none was changed:\n' + '\n'.join(
          f'  {step}: {why}' for step, why in failed) + '\nRestore them from a backup, or move them away to start '
          'this stage from scratch.')
    return None

  def _move_aside(self, step: int) -> None:
    """Moves an unreadable checkpoint to `<dir>.corrupt/<step>-<time>`, where no keep policy deletes a good one
    to make room for it and no later save collides with it."""
    if jax.process_index() == 0:
      dest = os.path.join(self.directory + '.corrupt',
                          f'{step}-{datetime.datetime.now().strftime("%Y%m%d-%H%M%S")}')
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), dest)
      log.warning('Moved the unreadable checkpoint %s/%d to %s.', self.directory, step, dest)
    self.manager.reload()

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except OSError as e:
      raise self._write_error(e) from e

  def close(self) -> None:
    self.wait()
    self.manager.close()
