"""Checkpoints: state + metadata round-trip, latest-k and best retention, fallback past a corrupt one (moved aside),
no fallback past an incompatible one, and a clear error when a write fails."""

import errno
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dtt_jax.checkpoint import Checkpointer, CheckpointError, CheckpointWriteError, IncompatibleCheckpointError


def _state(v):
  return {'params': {'w': jnp.full((3, 2), float(v))}, 'step': jnp.int32(v)}


def test_round_trip_and_retention(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2, best_metric='acc', async_save=False)
  for step, acc in ((1, 0.9), (2, 0.1), (3, 0.2), (4, 0.3)):
    ckpt.save(step, _state(step), {'data': {'epoch': step}}, metrics={'acc': acc})
  ckpt.wait()
  assert ckpt.steps() == [1, 3, 4]  # latest 2 plus the best (step 1)
  assert ckpt.best_step() == 1
  state, meta = ckpt.restore(3, _state(0))
  np.testing.assert_array_equal(state['params']['w'], np.full((3, 2), 3.0))
  assert meta['data'] == {'epoch': 3}
  ckpt.close()


def _corrupt(step_dir):
  for root, _, files in os.walk(step_dir / 'state'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')


def test_corrupt_latest_falls_back_and_is_moved_aside(tmp_path, caplog):
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'), keep=2, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _state(step), {'data': {'epoch': step}})
  ckpt.wait()
  _corrupt(tmp_path / 'checkpoints' / '2')
  with caplog.at_level(logging.WARNING):
    step, state, meta = ckpt.restore_latest(_state(0))
  assert step == 1 and meta['data'] == {'epoch': 1}
  np.testing.assert_array_equal(state['params']['w'], np.full((3, 2), 1.0))
  assert any('could not be read' in r.message and '/2' in r.message for r in caplog.records)
  # Out of the manager's directory: the keep-2 policy now keeps 1 and 3, and a new step 2 does not collide.
  moved = os.listdir(tmp_path / 'checkpoints.corrupt')
  assert len(moved) == 1 and moved[0].startswith('2-')
  ckpt.save(2, _state(2), {})
  ckpt.save(3, _state(3), {})
  ckpt.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']


def test_none_readable_is_an_error_listing_them_and_moves_nothing(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _state(step), {})
  ckpt.wait()
  for step in (1, 2):
    _corrupt(tmp_path / str(step))
  with pytest.raises(CheckpointError, match=r'(?s)No checkpoint in .* can be read; none was changed:\n  2: .*\n  1: '):
    ckpt.restore_latest(_state(0))
  assert sorted(os.listdir(tmp_path)) == ['1', '2']
  ckpt.close()


def test_other_shapes_are_incompatible_not_corrupt(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _state(step), {})
  ckpt.wait()
  wanted = {'params': {'w': jnp.zeros((4, 2))}, 'step': jnp.int32(0)}
  with pytest.raises(IncompatibleCheckpointError, match=r'/2 holds arrays of other shapes .*\n  params/w: '
                     r'\(3, 2\) saved, \(4, 2\) now'):
    ckpt.restore_latest(wanted)
  assert ckpt.steps() == [1, 2] and not os.path.exists(str(tmp_path) + '.corrupt')
  ckpt.close()


def test_failed_async_write_is_reported_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def full_disk(self, *args, **kwargs):
    if str(self._final_path).endswith('/2'):  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await finalize(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', full_disk)
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(1, _state(1), {})
  ckpt.save(2, _state(2), {})
  with pytest.raises(CheckpointWriteError, match=r'Writing checkpoint .*/2 failed \(OSError: \[Errno 28\] No '
                     r'space left on device\)\. Finished checkpoints, intact: 1\. .*rerun the same command'):
    ckpt.wait()
  monkeypatch.undo()
  step, state, _ = Checkpointer(str(tmp_path), async_save=False).restore_latest(_state(0))
  assert step == 1
  np.testing.assert_array_equal(state['params']['w'], np.full((3, 2), 1.0))


def test_no_checkpoint_gives_none(tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'empty'), async_save=False)
  assert ckpt.restore_latest(_state(0)) is None
  ckpt.close()


def test_restore_params_ignores_the_optimizer_layout(tmp_path):
  """A later stage reads only `params`: a checkpoint whose optimizer state has another structure still loads."""
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(5, dict(_state(5), opt_state=[{'mu': jnp.ones(4)}, ()]), {})
  ckpt.close()
  reader = Checkpointer(str(tmp_path), async_save=False)
  params = reader.restore_params(5, {'w': jnp.zeros((3, 2))})
  np.testing.assert_array_equal(params['w'], np.full((3, 2), 5.0))
  reader.close()


def test_best_ranks_by_summed_metrics_and_ties_go_to_the_later_step(tmp_path):
  """'accuracy+structure_rate': step 3 (0.87 + 0.996) beats step 2 (0.73 + 1.0); step 4 ties step 3 and wins."""
  ckpt = Checkpointer(str(tmp_path), keep=1, best_metric='accuracy+structure_rate', async_save=False)
  for step, acc, structure in ((1, 0.5, 0.9), (2, 0.73, 1.0), (3, 0.87, 0.996), (4, 0.866, 1.0), (5, 0.1, 1.0)):
    ckpt.save(step, _state(step), {}, metrics={'accuracy': acc, 'structure_rate': structure})
  ckpt.wait()
  assert ckpt.steps() == [4, 5]  # the latest and the best
  step, why = ckpt.choose('best')
  assert step == 4 and why.startswith('best by accuracy+structure_rate of steps {4: 1.8660, 5: 1.1000}')
  assert ckpt.choose('latest') == (5, 'the latest') and ckpt.choose('5') == (5, 'asked for')
  with pytest.raises(FileNotFoundError, match=r'No checkpoint 3 in .*; it holds steps 4, 5\.'):
    ckpt.choose('3')
  ckpt.close()


def test_why_shows_the_digits_that_tell_close_scores_apart(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2, best_metric='reward', async_save=False)
  for step, reward in ((10, 2.6342874), (20, 2.6342864)):
    ckpt.save(step, _state(step), {}, metrics={'reward': reward})
  ckpt.wait()
  assert ckpt.choose('best') == (10, 'best by reward of steps {10: 2.634287, 20: 2.634286}')
  ckpt.close()
