"""Training state and optimizer shared by both stages."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

GATE_MODULES = ('gate_head', 'proj')  # parameters with their own learning rate (gate_lr_mult)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any  # nested dict of arrays (nnx.merge(graphdef, params) rebuilds the model)
  opt_state: Any
  key: jax.Array  # uint32 key data [2]; the step's randomness is fold_in(key, step), so resume is exact


def split_model(model: nnx.Module):
  """-> (graphdef, params as a nested dict of arrays)."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def param_labels(params) -> Any:
  """'gate' for gate-head/projection parameters, 'trunk' for the rest (same tree structure as params)."""
  def label(path, _):
    names = {getattr(p, 'key', None) for p in path}
    return 'gate' if names & set(GATE_MODULES) else 'trunk'
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(lr: float, steps: int, warmup_steps: int, weight_decay: float, grad_clip: float,
                   gate_lr_mult: float = 1.0, frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with linear warmup + cosine decay; gate params at lr * gate_lr_mult.

  Weight decay applies to matrices (kernels, embeddings), not to biases or LayerNorm scales.
  """
  def adamw(peak):
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 1), max(steps, warmup_steps + 1),
                                                  end_value=peak * 0.1)
    return optax.adamw(schedule, weight_decay=weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))

  transforms = {'trunk': adamw(lr), 'gate': adamw(lr * gate_lr_mult)}
  for name in frozen:
    transforms[name] = optax.set_to_zero()
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.multi_transform(transforms, param_labels))


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    key=jax.random.key_data(jax.random.key(seed)))


def step_key(state: TrainState, salt: int = 0) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step), salt)
