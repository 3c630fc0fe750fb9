"""Orbax checkpoints of a training stage: array state + JSON metadata, latest k and the best kept, atomic, async.

Layout: `<dir>/<step>/state` (params, optimizer state, step, RNG key data: a pytree of arrays) and
`<dir>/<step>/meta` (JSON: data-iterator position, temperature state, config, vocabulary, validation metrics).
Orbax writes each step into a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint that looks finished. A checkpoint that fails to restore (e.g. corrupted on disk) is
reported and the previous one is used.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

log = logging.getLogger(__name__)


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
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None, force: bool = False) -> None:
    """Starts an (async) save; `metrics` (floats) rank the checkpoint for the best-k policy."""
    self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)),
                      metrics=metrics if (metrics and self.best_metric in metrics) else None, force=force)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the `params` of a saved state: what a later stage, an evaluation or an export needs. It does not
    depend on the optimizer's state layout, so it reads checkpoints of any optimizer configuration."""
    item = {'params': abstract_params}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args)).state['params']

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Newest checkpoint that restores, falling back to older ones with a warning; None when there is none."""
    self.wait()
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except Exception as e:  # pylint: disable=broad-except  # any unreadable checkpoint: fall back
        log.warning('Checkpoint %s/%d could not be restored (%s: %s); falling back to the previous one.',
                    self.directory, step, type(e).__name__, str(e)[:300])
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
