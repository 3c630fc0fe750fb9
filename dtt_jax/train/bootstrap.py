"""Stage 1, the supervised bootstrap (SPEC §5): cross-entropy + gate hinge through the exact recurrent blend.

    loss = CE(completion targets, fillers excluded) + lambda * (mean_inner relu(m_in - g) + mean_outer relu(g - m_out))

The completion is teacher-forced through the generation engine's step (`engine.unroll`), so the gate blends the
previous hidden state into every completion input exactly as at generation time. Attention to injected filler
keys is scaled by `noisy_span_scale` (log of it added to their attention logits).

Two exact speed-ups, both on by default (`LossConfig`): `fast_unroll` (the recurrence's hand-written backward pass,
`train/fast_unroll.py`; same values and gradients as autodiff through `engine.unroll`) and `fused_output` (the output
layer, cross-entropy and argmax in vocabulary tiles, `model/output_layer.py`: no [B,T,V] logits).

The step is one pure jitted function `(state, batch, tau) -> (state, metrics)`: the state is donated and laid out
by `parallel.state_shardings` (replicated at fsdp = 1), the batch is sharded over the ('data', 'fsdp') mesh.
Gradient accumulation over `microbatches` keeps the effective batch constant on any device count: every
microbatch's loss is normalised by the whole batch's counts, so the summed gradient equals the full-batch gradient.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dtt_jax import parallel
from dtt_jax.data.samples import BATCH_FIELDS
from dtt_jax.model import check_master_weights, output_layer
from dtt_jax.model.dtt import DTTModel, logistic_noise, pin_noise
from dtt_jax.model.gpt2 import Dropout
from dtt_jax.sampling import engine
from dtt_jax.train import fast_unroll, grads as grads_lib
from dtt_jax.train.state import TrainState, step_key


@dataclasses.dataclass(frozen=True)
class LossConfig:
  hinge_lambda: float = 0.1
  m_in: float = 0.9
  m_out: float = 0.1
  noisy_span_scale: float = 0.3
  gate_noise: bool = True
  hard_gate: bool = False
  fast_unroll: bool = True  # the recurrence's hand-written backward (`fast_unroll.unroll`); False: autodiff of it
  fused_output: bool = True  # output layer + cross-entropy in vocabulary tiles (`output_layer.cross_entropy`)
  row_groups: int = 1  # rows of the fused output layer sorted per group: the number of devices (`make_train_step`)
  dropout: float = 0.0  # GPT-2's training-mode dropout (`config.model.dropout`), masks from the step's key
  pinned_id: int = -1  # >= 0: the gate is 1 at this token (`model.dtt.pin_noise`; `config.model.pin_latent`)
  pin_others: bool = False  # with pinned_id: the gate is 0 at every other token (`config.model.pin_text`)

  @classmethod
  def from_config(cls, c, **overrides) -> LossConfig:
    """The fields `c` holds (the others keep their defaults), then `overrides`."""
    return cls(**{**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c}, **overrides})


COUNTED = ('loss_mask', 'inner_mask', 'outer_mask')


def _counts(batch) -> dict[str, jax.Array]:
  """Whole-batch normalisers of the mask fields present (at least 1)."""
  return {name: jnp.maximum(jnp.sum(batch[name]), 1).astype(jnp.float32) for name in COUNTED if name in batch}


def loss_terms(model: DTTModel, batch, noise, tau, cfg: LossConfig, counts, dropout_key=None):
  """Sums of the loss terms over `batch` divided by the (whole-batch) `counts` -> (loss, metrics).

  batch fields [B,P] / [B,T] as in `BATCH_FIELDS`; noise [B,T] logistic gate noise; dropout_key: the masks' key
  (with `cfg.dropout` > 0).
  """
  chex.assert_equal_shape([batch['completion'], batch['loss_mask'], noise])
  unroll = fast_unroll.unroll if cfg.fast_unroll else engine.unroll
  p, t = batch['prompt'].shape[1], batch['completion'].shape[1]
  dropout = Dropout(dropout_key, cfg.dropout, p + t) if cfg.dropout else None
  out = unroll(model, batch['prompt'], batch['prompt_mask'], batch['completion'], noise, tau,
               hard=cfg.hard_gate, completion_key_bias=engine.noisy_span_bias(batch['filler_mask'], cfg.noisy_span_scale),
               dropout=dropout)
  ce, prediction = output_layer.cross_entropy(model.gpt2, out.target_hidden, batch['completion'],
                                              batch['loss_mask'] / counts['loss_mask'], cfg.fused_output,
                                              cfg.row_groups)
  gates = out.gates
  hinge_in = jnp.sum(jax.nn.relu(cfg.m_in - gates) * batch['inner_mask']) / counts['inner_mask']
  hinge_out = jnp.sum(jax.nn.relu(gates - cfg.m_out) * batch['outer_mask']) / counts['outer_mask']
  loss = ce + cfg.hinge_lambda * (hinge_in + hinge_out)
  correct = (prediction == batch['completion']) * batch['loss_mask']
  metrics = {
      'loss': loss, 'ce': ce, 'hinge': hinge_in + hinge_out,
      'gate_inner': jnp.sum(gates * batch['inner_mask']) / counts['inner_mask'],
      'gate_outer': jnp.sum(gates * batch['outer_mask']) / counts['outer_mask'],
      'token_accuracy': jnp.sum(correct) / counts['loss_mask'],
  }
  return loss, metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: LossConfig, mesh, microbatches: int = 1,
                    trained=None):
  """-> jitted `train_step(state, batch, tau) -> (state, metrics)` of the Stage-1 loss (`make_step`)."""
  cfg = dataclasses.replace(cfg, row_groups=parallel.num_shards(mesh))

  def loss_fn(model, batch, key, tau, counts):
    shape = batch['completion'].shape
    noise = logistic_noise(key, shape) if cfg.gate_noise else jnp.zeros(shape, jnp.float32)
    noise = pin_noise(noise, batch['completion'], cfg.pinned_id, cfg.pin_others)
    return loss_terms(model, batch, noise, tau, cfg, counts, jax.random.fold_in(key, 1))

  return make_step(graphdef, tx, loss_fn, BATCH_FIELDS, mesh, microbatches, trained, vocab_parallel=True)


def make_step(graphdef, tx: optax.GradientTransformation, loss_fn, fields, mesh, microbatches: int = 1,
              trained=None, vocab_parallel: bool = False):
  """-> jitted `train_step(state, batch, tau) -> (state, metrics)` (state donated and laid out by
  `parallel.state_shardings`, batch sharded over ('data', 'fsdp')).

  `loss_fn(model, batch, key, tau, counts) -> (loss, metrics)` sums its terms over `batch` and divides by the
  whole-batch `counts` (`_counts`), so microbatch gradients add up to the full-batch gradient; `fields`: the batch
  entries the step takes; `trained`: `grads.trained_filter` of the optimizer's trained parameters (None: all), the
  only ones differentiated. The whole model is gathered before the loss (`grads.grad`), but the vocabulary tables
  with `vocab_parallel` (the recurrent bootstrap's setting)."""

  def train_step(state: TrainState, batch, tau):
    check_master_weights(state.params)  # at trace time: float32 master weights (config.model.param_dtype)
    batch = {k: batch[k] for k in fields}
    counts = _counts(batch)
    key = step_key(state)

    def one(mb, m):
      k = key if microbatches == 1 else jax.random.fold_in(key, m)
      loss = lambda params: loss_fn(nnx.merge(graphdef, params), mb, k, tau, counts)
      return grads_lib.grad(loss, state.params, mesh, trained, vocab_parallel=vocab_parallel), None

    (grads, metrics), _ = grads_lib.accumulate(one, grads_lib.split_microbatches(batch, microbatches), microbatches,
                                                 mesh)
    grads = grads_lib.fill_frozen(grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = grads_lib.apply_updates(state.params, updates, trained)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), tau=jnp.asarray(tau, jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return parallel.jit_sharded(train_step, mesh, (parallel.STATE, sharded, replicated), (parallel.STATE, replicated),
                              donate_argnums=0)
