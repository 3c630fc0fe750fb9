"""Training state and optimizer shared by both stages."""

from __future__ import annotations

import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

log = logging.getLogger(__name__)

GATE_MODULES = ('gate_head', 'proj', 'hrpo')  # parameters with their own learning rate (gate_lr_mult)
LORA_MODULE = 'lora'  # LoRA adapters (`model/lora.py`): with them in the tree, the rest of the trunk is frozen
# except `config.lora.train_modules`


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


def _names(path) -> set:
  return {getattr(p, 'key', None) for p in path}


def has_lora(params) -> bool:
  return any(LORA_MODULE in _names(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))


def param_labels(params, train_modules: tuple[str, ...] = ()) -> Any:
  """Same tree structure as params: 'gate' for gate parameters (head, projection, HRPO gate), 'trunk' for the rest;
  when the tree holds LoRA adapters, 'trunk' is the adapters and the modules named in `train_modules` (path
  components such as 'wte'; `config.lora.train_modules`), and every other parameter is 'base' (frozen)."""
  lora = has_lora(params)
  trained = {LORA_MODULE, *train_modules}

  def label(path, _):
    names = _names(path)
    if names & set(GATE_MODULES):
      return 'gate'
    return 'trunk' if not lora or names & trained else 'base'
  return jax.tree_util.tree_map_with_path(label, params)


SCHEDULES = ('warmup_cosine', 'constant')
DECAYS = ('matrices', 'all')


def make_optimizer(lr: float, steps: int, warmup_steps: int, weight_decay: float, grad_clip: float,
                   gate_lr_mult: float = 1.0, frozen: tuple[str, ...] = (), train_modules: tuple[str, ...] = (),
                   schedule: str = 'warmup_cosine', decay: str = 'matrices') -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with linear warmup + cosine decay; gate params at lr * gate_lr_mult.

  `schedule='constant'`: lr throughout (`steps`, `warmup_steps` unused); `grad_clip <= 0`: no clipping;
  `decay='all'`: weight decay on every parameter (PyTorch's `AdamW(model.parameters())`, COCONUT's optimizer).
  By default weight decay applies to matrices (kernels, embeddings), not to biases or LayerNorm scales. Labels in
  `frozen`, and the 'base' label when the params hold LoRA adapters (all but adapters, gate and `train_modules`,
  see `param_labels`), get `set_to_zero`: their gradients are zeroed before clipping (the norm is that of the
  trained parameters) and they hold no Adam moments. The transformation is picked by the tree it is given, so a
  model without adapters keeps exactly the state layout (and checkpoints) it had before LoRA existed. The train
  steps still differentiate the whole tree (their `grad_norm` metric includes the frozen gradients): freezing saves
  optimizer memory and the update, not the backward pass.
  """
  if schedule not in SCHEDULES or decay not in DECAYS:
    raise ValueError(f'make_optimizer: schedule={schedule!r}, decay={decay!r}; expected one of {SCHEDULES}, '
                     f'{DECAYS}.')

  def adamw(peak):
    rate = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 1), max(steps, warmup_steps + 1),
                                              end_value=peak * 0.1) if schedule == 'warmup_cosine' else peak
    mask = (lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)) if decay == 'matrices' else None
    return optax.adamw(rate, weight_decay=weight_decay, mask=mask)

  labels = lambda params: param_labels(params, train_modules)

  def build(frozen_labels):
    transforms = {'trunk': adamw(lr), 'gate': adamw(lr * gate_lr_mult)}
    transforms.update({name: optax.set_to_zero() for name in frozen_labels})
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    if frozen_labels:
      is_frozen = lambda p: jax.tree.map(lambda label: label in frozen_labels, labels(p))
      clip = optax.chain(optax.masked(optax.set_to_zero(), is_frozen), clip)
    return optax.chain(clip, optax.multi_transform(transforms, labels))

  plain, with_lora = build(tuple(frozen)), build(('base',) + tuple(frozen))
  pick = lambda tree: with_lora if has_lora(tree) else plain
  return optax.GradientTransformation(lambda params: pick(params).init(params),
                                      lambda updates, state, params=None: pick(updates).update(updates, state, params))


def supervised_optimizer(b, steps: int, train_modules: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """The optimizer of every supervised method (DTT's bootstrap, COCONUT and its baselines) from a
  `config.bootstrap` section: lr, schedule, warmup_steps, weight_decay, decay, grad_clip, gate_lr_mult; a
  warmup_cosine schedule spans `steps`."""
  return make_optimizer(b.lr, steps, b.warmup_steps, b.weight_decay, b.grad_clip, b.gate_lr_mult,
                        train_modules=train_modules, schedule=b.schedule, decay=b.decay)


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  opt_state = tx.init(params)
  size = lambda tree: sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))
  log.info('%d parameters, optimizer state %d values.', size(params), size(opt_state))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    key=jax.random.key_data(jax.random.key(seed)))


def step_key(state: TrainState, salt: int = 0) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step), salt)
