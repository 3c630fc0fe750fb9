"""LoRA on the trunk's attention and MLP projections (`config.lora`), with Flax NNX's own `nnx.LoRALinear`.

    y = x W + b + (alpha / rank) * (x A) B        A [in, rank] (he-uniform), B [rank, out] (zeros): y = x W + b at init

`apply_lora` swaps the target `nnx.Linear` modules of every block for `LoRALinear` (module surgery after the model
is built, so `gpt2.py` stays as it is); the base kernel and bias keep their paths (`h[i].attn.c_attn.kernel`), the
adapter adds `h[i].attn.c_attn.lora.lora_a` / `lora_b`. Training: `train.state.param_labels` sees the adapters and
labels every other parameter 'base' (a zero update and no optimizer moments in both stages), except the gate and the
modules of `config.lora.train_modules` (PEFT's `modules_to_save`; default the tied embedding `wte`, without which the
DTT special tokens, initialised as copies of one pretrained row, keep identical logits), which train fully.
Fine-tuning a trained model: `methods.base.stage_params` restores a checkpoint without adapters into a model with them
(`without_adapters` / `with_adapters`); the fresh adapters have B = 0, so the model starts as the checkpoint's.
Export: `merged` folds W + (alpha / rank) A B back into plain `nnx.Linear` modules (`hf_io.export_pretrained`
calls it; `export_llama` folds `merged_kernel` itself), so the HF checkpoint is an ordinary GPT-2 / Llama / Qwen2.

Targets and train_modules are named per family (`FAMILY_TARGETS`, `FAMILY_TRAIN_MODULES`): GPT-2's `attn.c_attn`, ...
(HF GPT-2's module names); the Llama family's `self_attn.q_proj`, ..., `mlp.down_proj` (HF Llama / Qwen2's).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dtt_jax.model.gpt2 import GPT2
from dtt_jax.model.llama import Llama

TARGETS = ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')  # per block, HF GPT-2 module names
TRAIN_MODULES = ('wte', 'wpe', 'ln_1', 'ln_2', 'ln_f')  # GPT-2 modules that `train_modules` may train fully
LLAMA_TARGETS = ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj',
                 'mlp.up_proj', 'mlp.down_proj')  # per block, HF Llama / Qwen2 module names
LLAMA_TRAIN_MODULES = ('wte', 'lm_head', 'input_layernorm', 'post_attention_layernorm', 'norm')
FAMILY_TARGETS = {'gpt2': TARGETS, 'llama': LLAMA_TARGETS, 'qwen2': LLAMA_TARGETS}
FAMILY_TRAIN_MODULES = {'gpt2': TRAIN_MODULES, 'llama': LLAMA_TRAIN_MODULES, 'qwen2': LLAMA_TRAIN_MODULES}
ADAPTER = 'lora'  # the adapter's attribute in `LoRALinear` (`nnx.LoRALinear.lora`): a path component of A and B


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = TARGETS
  train_modules: tuple[str, ...] = ('wte',)  # trained fully besides adapters and gate (every block's, for ln_*)
  family: str | None = 'gpt2'  # the trunk's ('gpt2' | 'llama' | 'qwen2'); None: not known yet, names unchecked

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f'config.lora.rank={self.rank!r} must be a positive integer.')
    if self.alpha <= 0:
      raise ValueError(f'config.lora.alpha={self.alpha} must be > 0.')
    if self.family is None:
      return
    valid = FAMILY_TARGETS[self.family]
    unknown = [t for t in self.targets if t not in valid]
    if not self.targets or unknown:
      raise ValueError(f'config.lora.targets={tuple(self.targets)}: expected a non-empty subset of {valid} (the '
                       f'{self.family} family\'s projections).')
    valid = FAMILY_TRAIN_MODULES[self.family]
    unknown = [m for m in self.train_modules if m not in valid]
    if unknown:
      raise ValueError(f'config.lora.train_modules={tuple(self.train_modules)}: unknown module(s) {unknown}; '
                       f'expected a subset of {valid} (the {self.family} family\'s; or () to train only adapters '
                       'and gate).')

  @classmethod
  def from_config(cls, c, family: str | None = 'gpt2') -> LoRAConfig:
    """`c`: the `config.lora` section; `family`: the trunk's (None: unknown until a hub checkpoint is fetched)."""
    return cls(rank=c.rank, alpha=float(c.alpha), targets=tuple(c.targets), train_modules=configured_train_modules(c),
               family=family)


def configured_train_modules(c) -> tuple[str, ...]:
  """`config.lora.train_modules` (`c`: the `config.lora` section or None); () for the config of a run from before
  the key (it trained only adapters and gate)."""
  modules = c.get('train_modules', ()) if c is not None else ()
  return (modules,) if isinstance(modules, str) else tuple(modules)


class LoRALinear(nnx.LoRALinear):
  """`nnx.LoRALinear` with the adapter's output scaled by alpha / rank."""

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
    super().__init__(base.in_features, base.out_features, lora_rank=rank, lora_dtype=base.dtype,
                     lora_param_dtype=base.param_dtype, dtype=base.dtype, param_dtype=base.param_dtype,
                     use_bias=base.use_bias, rngs=rngs)
    self.kernel, self.bias = base.kernel, base.bias  # the base's own variables (same values, same paths)
    self.scale = alpha / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.Linear.__call__(self, x) + self.scale * self.lora(x)

  def merged_kernel(self) -> jax.Array:
    """W + (alpha / rank) A B, [in, out], computed in float32, in the parameters' dtype."""
    f32 = lambda v: v[...].astype(jnp.float32)
    return (f32(self.kernel) + self.scale * (f32(self.lora.lora_a) @ f32(self.lora.lora_b))).astype(self.param_dtype)


def _target_modules(gpt2: GPT2 | Llama, targets):
  """(parent module, attribute name) of each target in each block."""
  for block in (gpt2.layers if isinstance(gpt2, Llama) else gpt2.h):
    for target in targets:
      parent, name = target.split('.')
      yield getattr(block, parent), name


def apply_lora(gpt2: GPT2 | Llama, cfg: LoRAConfig, rngs: nnx.Rngs) -> GPT2 | Llama:
  """Replaces the target projections of the trunk `gpt2` (either family) in place by `LoRALinear` around the same
  weights; returns it. The targets must be the trunk's family's (an error naming config.lora.targets otherwise)."""
  if cfg.family != gpt2.cfg.family:
    cfg = dataclasses.replace(cfg, family=gpt2.cfg.family)  # checks the names against the trunk's family
  for parent, name in _target_modules(gpt2, cfg.targets):
    setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, rngs=rngs))
  return gpt2


def merged(gpt2: GPT2 | Llama) -> GPT2 | Llama:
  """A copy of the trunk with every `LoRALinear` folded into a plain `nnx.Linear` (W + (alpha / rank) A B)."""
  gpt2 = nnx.clone(gpt2)
  for parent, name in _target_modules(gpt2, FAMILY_TARGETS[gpt2.cfg.family]):
    module = getattr(parent, name)
    if isinstance(module, LoRALinear):
      kernel = module.merged_kernel()
      setattr(parent, name, nnx.Linear(module.in_features, module.out_features, use_bias=module.bias is not None,
                                       dtype=module.dtype, param_dtype=module.param_dtype,
                                       kernel_init=lambda *_: kernel,
                                       bias_init=lambda *_: module.bias[...], rngs=nnx.Rngs(0)))
  return gpt2


def _is_adapter(path) -> bool:
  return any(getattr(p, 'key', None) == ADAPTER for p in path)


def without_adapters(params: dict) -> dict:
  """The nested params dict without its adapter subtrees: the layout of the same model without LoRA."""
  return {k: without_adapters(v) if isinstance(v, dict) else v for k, v in params.items() if k != ADAPTER}


def with_adapters(base: dict, params: dict) -> dict:
  """`base` (a `without_adapters` layout) with the adapter subtrees of `params` added."""
  out = {}
  for k, v in params.items():
    if k == ADAPTER:
      out[k] = v
    else:
      out[k] = with_adapters(base[k], v) if isinstance(v, dict) else base[k]
  return out


def adapter_shapes(params) -> dict[str, tuple[int, ...]]:
  """{'gpt2.h.0.attn.c_attn.lora.lora_a': shape, ...} of the adapter entries of a params tree (arrays, or the array
  metadata of a checkpoint, whose list indices are strings)."""
  return {'.'.join(str(getattr(p, 'key', p)) for p in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(params) if _is_adapter(path)}


def describe_adapters(shapes: dict[str, tuple[int, ...]]) -> str:
  """'rank 8 on attn.c_attn, mlp.c_fc' for `adapter_shapes`' output; 'none' when empty."""
  if not shapes:
    return 'none'
  ranks = sorted({shape[-1] for key, shape in shapes.items() if key.endswith('lora_a')})
  targets = sorted({'.'.join(key.split('.')[-4:-2]) for key in shapes})
  return f'rank {"/".join(map(str, ranks))} on {", ".join(targets)}'


def count_params(params) -> dict[str, int]:
  """Parameter counts of a params tree: 'total' and 'lora' (adapter entries)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {'total': sum(int(jnp.size(x)) for _, x in leaves),
          'lora': sum(int(jnp.size(x)) for path, x in leaves if _is_adapter(path))}
