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
* Arrays are saved as they are laid out (sharded or not) and restored with the shardings of the abstract tree
  asked for (`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, e.g. `parallel.state_shardings`), so a
  checkpoint written on one mesh shape (fsdp = 4) restores onto another (data = 4, or 2 x 2).
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


def metric_score(metrics: dict, names: str) -> float:
  """The sum of the '+'-joined validation metrics `names` ('accuracy+structure_rate')."""
  return sum(float(metrics[n]) for n in names.split('+'))


class Checkpointer:
  """Save/restore (state pytree, meta dict) by step. Keeps the latest `keep` and the best by `best_metric` (one
  metric, or several joined by '+' and summed; higher is better; ties go to the later step)."""

  def __init__(self, directory: str, keep: int = 3, best_metric: str | None = None, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    rank = lambda m: metric_score(m, best_metric) + 1e-9 * m['step']  # the step only breaks exact ties
    policies = [checkpoint_managers.LatestN(keep)]
    if best_metric:
      policies.append(checkpoint_managers.BestN(get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=rank if best_metric else None, best_mode='max',
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
    ranked = self.best_metric and metrics and all(n in metrics for n in self.best_metric.split('+'))
    try:
      self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)),
                        metrics=dict(metrics, step=int(step)) if ranked else None, force=force)
    except OSError as e:  # the previous async save failed (reported now), or this one could not start
      raise self._write_error(e) from e
    self._writing = int(step)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else None

  def choose(self, which: str = 'best') -> tuple[int, str]:
    """(step, why) of the checkpoint `which` names: 'best' (by `best_metric`; the latest when none was ranked),
    'latest', or a step number."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    if str(which).isdigit():
      if int(which) not in steps:
        raise FileNotFoundError(f'No checkpoint {which} in {self.directory}; it holds steps '
                                f'{", ".join(map(str, steps))}.')
      return int(which), 'asked for'
    if which not in ('best', 'latest'):
      raise ValueError(f"checkpoint {which!r}: expected 'best', 'latest' or a step number.")
    best = self.best_step() if which == 'best' else None
    if best is None:
      return steps[-1], 'the latest' + (' (no checkpoint was ranked)' if which == 'best' else '')
    ranked = {s: metric_score(self.manager.metrics(s), self.best_metric) for s in steps if self.manager.metrics(s)}
    digits = 4  # enough for the scores to show which is higher (ties: exactly equal, the later step wins)
    while digits < 9 and len({round(v, digits) for v in ranked.values()}) < len(set(ranked.values())):
      digits += 1
    scores = ', '.join(f'{s}: {v:.{digits}f}' for s, v in ranked.items())
    return best, f'best by {self.best_metric} of steps {{{scores}}}'

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
