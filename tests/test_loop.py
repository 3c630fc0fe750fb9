"""The training loop resumes exactly, checkpoints on SIGTERM, and stops on a non-finite loss keeping the last
good checkpoint."""

import os
import signal

import jax
import numpy as np
import pytest

from dtt_jax import parallel
from dtt_jax.checkpoint import Checkpointer
from dtt_jax.metrics import MetricWriter
from dtt_jax.train import bootstrap, loop, state as state_lib
from dtt_jax.train.temperature import Temperature
from tests.test_bootstrap_step import _model, make_batch


class CountingData:
  """Deterministic batches indexed by position; `state()`/`restore()` as the real iterators."""

  def __init__(self):
    self.index = 0

  def __next__(self):
    self.index += 1
    return make_batch(8, seed=self.index)

  def state(self):
    return {'index': self.index}

  def restore(self, state):
    self.index = state['index']


def _setup(workdir, steps, mesh, poison_at=None):
  graphdef, params = state_lib.split_model(_model())
  tx = state_lib.make_optimizer(1e-2, steps, 2, 0.01, 1.0)
  state = parallel.replicate(state_lib.init_state(jax.device_get(params), tx, seed=0), mesh)
  train_step = bootstrap.make_train_step(graphdef, tx, bootstrap.LossConfig(), mesh)

  def step_fn(state, batch, tau):
    if poison_at is not None and int(state.step) + 1 == poison_at:
      batch = dict(batch)
      tau = float('nan')
    return train_step(state, parallel.shard_batch(batch, mesh), tau)

  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=2, async_save=False)
  cfg = loop.LoopConfig('bootstrap', steps=steps, log_every=1, eval_every=0, checkpoint_every=2)
  return state, step_fn, ckpt, cfg


def _train(workdir, steps, stop_after=None, poison_at=None):
  mesh = parallel.make_mesh(1)
  state, step_fn, ckpt, cfg = _setup(workdir, steps, mesh, poison_at)
  data = CountingData()
  temperature = Temperature(total_steps=steps)
  if stop_after is not None:
    inner = step_fn

    def step_fn(state, batch, tau):  # pylint: disable=function-redefined
      out = inner(state, batch, tau)
      if int(out[0].step) == stop_after:
        os.kill(os.getpid(), signal.SIGTERM)
      return out

  result = loop.run(cfg, state, step_fn, data, temperature, ckpt, MetricWriter(str(workdir)))
  ckpt.close()
  return result


def test_resume_is_exact(tmp_path):
  straight = _train(tmp_path / 'a', steps=6)
  first = _train(tmp_path / 'b', steps=6, stop_after=3)
  assert first.interrupted and first.step == 3
  second = _train(tmp_path / 'b', steps=6)
  assert not second.interrupted and second.step == 6
  for x, y in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(second.state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  lines = (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == 6 and '"bootstrap/loss"' in lines[0]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(loop.NonFiniteLossError,
                     match=r'non-finite metrics at step 3 .*the last good checkpoint is .*/2\.'):
    _train(tmp_path, steps=6, poison_at=3)
  assert Checkpointer(str(tmp_path / 'checkpoints')).steps() == [2]


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match=r'non-finite metrics at step 1 .*: no checkpoint yet in .*'):
    _train(tmp_path, steps=6, poison_at=1)
