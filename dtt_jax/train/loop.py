"""The training loop shared by both stages: resume, periodic validation and checkpoints, late metric fetches,
SIGTERM handling and a NaN guard.

* Resume: the newest restorable checkpoint in `<stage_dir>/checkpoints` gives the state (params, optimizer, step,
  RNG), the data-iterator position and the temperature state, so a resumed run continues exactly.
* Metrics of step s are fetched after step s+1 has been dispatched, so the device never waits for logging.
* SIGTERM/SIGINT: the current step finishes, a checkpoint is written, and the loop returns `interrupted=True`.
* A non-finite loss stops the run with an error naming the step; no checkpoint is written after it, so the last
  good one is kept.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from collections.abc import Callable
from typing import Any

import jax
from tqdm import tqdm

from dtt_jax.checkpoint import Checkpointer
from dtt_jax.metrics import MetricWriter, to_python
from dtt_jax.train.temperature import Temperature

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  name: str  # 'bootstrap' | 'grpo': metric prefix
  steps: int
  log_every: int = 20
  eval_every: int = 200
  checkpoint_every: int = 200
  best_metric: str = ''  # validation metric (higher is better) driving the temperature plateau rule and best ckpt


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  interrupted: bool
  last_validation: dict[str, float]


class NonFiniteLossError(FloatingPointError):
  pass


class _StopFlag:
  """Turns SIGTERM/SIGINT into a flag checked between steps (restored on exit)."""

  def __init__(self):
    self.raised = None

  def __enter__(self):
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, _frame):
    log.warning('Received signal %d: finishing the current step, then checkpointing and exiting.', signum)
    self.raised = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def run(cfg: LoopConfig, state, step_fn: Callable, data, temperature: Temperature, checkpointer: Checkpointer,
        writer: MetricWriter, validate: Callable[[Any, int, float], dict[str, float]] | None = None,
        meta: dict | None = None) -> LoopResult:
  """Runs `state, metrics = step_fn(state, next(data), tau)` until `cfg.steps`, resuming from `checkpointer`.

  `data`: an iterator with `state() -> dict` and `restore(dict)`; `validate(state, step, tau) -> metrics`.
  `meta`: extra JSON saved in every checkpoint (config, vocabulary).
  """
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = checkpointer.restore_latest(abstract)
  if restored is not None:
    step, state, saved = restored
    data.restore(saved['data'])
    temperature.restore(saved['temperature'])
    log.info('%s: resumed from %s at step %d.', cfg.name, checkpointer.directory, step)
  step = int(jax.device_get(state.step))
  last_validation: dict[str, float] = {}

  def save(step, metrics=None, force=False):
    checkpointer.save(step, state, {'data': data.state(), 'temperature': temperature.state(),
                                    'validation': metrics or {}, **(meta or {})},
                      metrics=metrics, force=force)

  def check_finite(s, metrics):
    values = to_python(metrics)
    if not all(math.isfinite(v) for v in values.values()):
      checkpointer.wait()
      last = checkpointer.steps()
      bad = ', '.join(f'{k}={v}' for k, v in values.items() if not math.isfinite(v))
      where = (f'the last good checkpoint is {checkpointer.directory}/{last[-1]}' if last else
               f'no checkpoint yet in {checkpointer.directory}')
      raise NonFiniteLossError(f'{cfg.name}: non-finite metrics at step {s} ({bad}); stopping: {where}.')
    return values

  pending = None  # (step, device metrics) fetched one step late
  interrupted = False
  with _StopFlag() as stop, tqdm(total=cfg.steps, initial=step, desc=cfg.name, dynamic_ncols=True,
                                 disable=jax.process_index() != 0) as bar:
    while step < cfg.steps:
      tau = temperature(step)
      state, metrics = step_fn(state, next(data), tau)
      step += 1
      bar.update(1)
      if pending is not None:
        s, m = pending
        values = check_finite(s, m)
        if s % cfg.log_every == 0 or s == 1:
          writer.write(s, {f'{cfg.name}/{k}': v for k, v in values.items()})
          bar.set_postfix(loss=f'{values.get("loss", float("nan")):.4f}', tau=f'{tau:.3f}')
      pending = (step, metrics)
      finished, stopping = step == cfg.steps, stop.raised is not None
      if validate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or finished):
        check_finite(*pending)
        last_validation = validate(state, step, tau)
        writer.write(step, {f'{cfg.name}/valid/{k}': v for k, v in last_validation.items()})
        if cfg.best_metric and cfg.best_metric in last_validation:
          if temperature.update(last_validation[cfg.best_metric]):
            log.info('%s: %s plateaued; temperature scale now %.3f.', cfg.name, cfg.best_metric, temperature.scale)
        save(step, {k: float(v) for k, v in last_validation.items()}, force=finished)
      elif finished or stopping or step % cfg.checkpoint_every == 0:
        check_finite(*pending)
        save(step, force=finished or stopping)
      if stop.raised is not None:
        interrupted = True
        break
    values = check_finite(*pending) if pending is not None else {}
    if values:
      writer.write(pending[0], {f'{cfg.name}/{k}': v for k, v in values.items()})
  checkpointer.wait()
  writer.flush()
  return LoopResult(state, step, interrupted, last_validation)

