"""Checkpoints: state + metadata round-trip, latest-k and best retention, and fallback past a corrupt one."""

import logging
import os

import jax.numpy as jnp
import numpy as np

from dtt_jax.checkpoint import Checkpointer


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


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
  ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _state(step), {'data': {'epoch': step}})
  ckpt.wait()
  for root, _, files in os.walk(tmp_path / '2' / 'state'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  with caplog.at_level(logging.WARNING):
    step, state, meta = ckpt.restore_latest(_state(0))
  assert step == 1 and meta['data'] == {'epoch': 1}
  np.testing.assert_array_equal(state['params']['w'], np.full((3, 2), 1.0))
  assert any('could not be restored' in r.message and '/2' in r.message for r in caplog.records)
  ckpt.close()


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
