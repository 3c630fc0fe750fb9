"""Metric logging: JSONL and TensorBoard event files in the workdir, optional wandb. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)


def to_python(metrics: Mapping) -> dict[str, float]:
  """Device/numpy scalars -> floats (fetching them from the device)."""
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is installed only to
  accept torch tensors (seconds per process; this writer logs floats)."""
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError while tensorboardX is imported
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """`write(step, {'train/loss': ...})` appends a JSON line to `<workdir>/metrics.jsonl` and logs to TensorBoard
  (`<workdir>/tensorboard`); with `wandb_cfg.enabled` also to Weights & Biases (mode from `wandb_cfg.mode`,
  'offline' works without network)."""

  def __init__(self, workdir: str, wandb_cfg=None, run_config: dict | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = self._wandb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._tb = _summary_writer_class()(os.path.join(workdir, 'tensorboard'))
    if wandb_cfg is not None and wandb_cfg.get('enabled', False):
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb = wandb.init(project=wandb_cfg.get('project', 'dtt_jax'), mode=wandb_cfg.get('mode', 'offline'),
                               dir=workdir, config=run_config or {}, name=wandb_cfg.get('name') or None)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = to_python(metrics)
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), 'time': time.time(), **values}) + '\n')
    for k, v in values.items():
      self._tb.add_scalar(k, v, int(step))
    if self._wandb is not None:
      self._wandb.log(values, step=int(step))

  def histogram(self, step: int, name: str, values: np.ndarray) -> None:
    if not self.enabled or len(values) == 0:
      return
    self._tb.add_histogram(name, np.asarray(values), int(step))
    if self._wandb is not None:
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb.log({name: wandb.Histogram(np.asarray(values))}, step=int(step))

  def table(self, step: int, name: str, rows: list[dict]) -> None:
    """A per-example table (wandb only; the eval stage also writes it as JSONL/CSV)."""
    if self._wandb is not None and rows:
      import wandb  # pylint: disable=g-import-not-at-top
      columns = list(rows[0])
      self._wandb.log({name: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
