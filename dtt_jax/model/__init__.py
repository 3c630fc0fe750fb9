"""The trunk families GPT-2 (`gpt2.py`) and Llama / Qwen2 (`llama.py`) behind one interface, HF checkpoint I/O
(`hf_io.py`), the DTT gate module (`dtt.py`) and LoRA (`lora.py`).

The family of a model: `config.model.family` for a fresh one (`init='scratch'`), the checkpoint's `config.json`
(`model_type`) for pretrained weights. Either way the trunk sits in `DTTModel.gpt2` (the attribute's name is part
of every checkpoint's parameter paths) and reports its family as `cfg.family`.

Precision (`precision`): `config.model.dtype` is the compute dtype of matmuls and attention ('float32' | 'bfloat16'),
`config.model.param_dtype` the stored parameters' ('float32', the default: float32 master weights, gradients and
optimizer state; 'bfloat16' halves the weights' memory for inference only, and the train steps refuse it,
`check_master_weights`). What stays float32 under bfloat16 compute: `gpt2.py`'s module docstring.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from dtt_jax import tokens
from dtt_jax.model import hf_io, lora
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2Config, check_precision
from dtt_jax.model.llama import LlamaConfig

log = logging.getLogger(__name__)

FAMILIES = ('gpt2', 'llama', 'qwen2')  # config.model.family


def precision(model_cfg) -> tuple[str, str]:
  """-> (compute dtype, parameter dtype) of `config.model` (`dtype`, `param_dtype`; runs from before the
  `param_dtype` key: 'float32'), each checked against `gpt2.DTYPES` by a ValueError naming its key."""
  dtype, param_dtype = model_cfg.dtype, model_cfg.get('param_dtype', 'float32')
  check_precision(dtype, param_dtype)
  return dtype, param_dtype


def check_master_weights(params) -> None:
  """Raises a ValueError naming config.model.param_dtype when a floating parameter of `params` (a pytree) is not
  float32: a train step keeps float32 master weights and optimizer state (bfloat16 parameters are for inference)."""
  low = sorted({str(x.dtype) for x in jax.tree.leaves(params)
                if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32})
  if low:
    raise ValueError(f'Training needs float32 parameters (master weights), but some are {", ".join(low)}: set '
                     'config.model.param_dtype="float32" (config.model.dtype="bfloat16" still computes in bfloat16).')


def trunk_config(model_cfg, vocab: tokens.Vocab) -> GPT2Config | LlamaConfig:
  """The config of a fresh trunk from `config.model` (family, sizes) rows for `vocab`. The Llama family: head_dim
  n_embd / n_head, n_kv_head 0 = n_head, intermediate_size 0 = 4 n_embd; 'qwen2' adds the q/k/v biases."""
  m = model_cfg
  family = m.get('family', 'gpt2')  # runs from before the key: GPT-2
  dtype, param_dtype = precision(m)
  sizes = dict(vocab_rows=vocab.num_rows, num_tokens=vocab.num_tokens, n_positions=m.n_positions, n_embd=m.n_embd,
               n_layer=m.n_layer, n_head=m.n_head, dtype=dtype, param_dtype=param_dtype, remat=m.get('remat', 'none'))
  if family == 'gpt2':
    return GPT2Config(**sizes)
  if family not in FAMILIES:
    raise ValueError(f'config.model.family={family!r}: expected one of {", ".join(map(repr, FAMILIES))}.')
  return LlamaConfig(**sizes, n_kv_head=m.n_kv_head or m.n_head, head_dim=m.n_embd // m.n_head,
                     intermediate_size=m.intermediate_size or 4 * m.n_embd, rope_theta=float(m.rope_theta),
                     tie_word_embeddings=bool(m.tie_word_embeddings), qkv_bias=family == 'qwen2', family=family)


def configured_family(model_cfg) -> str | None:
  """The family as far as the config tells without fetching anything: `config.model.family` for 'scratch', the
  `config.json` of a local checkpoint directory, None for a hub name (known once `build_model` fetched it)."""
  if model_cfg.init == 'scratch':
    return model_cfg.get('family', 'gpt2')
  if os.path.isdir(model_cfg.init):
    return hf_io.model_family(hf_io.read_config_json(model_cfg.init))
  return None


def build_model(model_cfg, vocab: tokens.Vocab, seed: int = 0, lora_cfg=None) -> DTTModel:
  """From the `config.model` section: a fresh trunk of `model_cfg.family` ('scratch') or pretrained weights (hub
  name or local HF dir, the family from its config.json) mapped into `vocab`, in the configured `precision`,
  wrapped with the DTT gate
  (`model.gate`: 'dtt' or 'hrpo'). `lora_cfg` (the `config.lora` section): with `enabled`, LoRA adapters on its
  target projections (then only adapters and gate train)."""
  if model_cfg.init == 'scratch':
    trunk, trunk_cfg = None, trunk_config(model_cfg, vocab)
  else:
    dtype, param_dtype = precision(model_cfg)
    trunk = hf_io.load_model(model_cfg.init, vocab=vocab, dtype=dtype, seed=seed, param_dtype=param_dtype)
    trunk.cfg = dataclasses.replace(trunk.cfg, remat=model_cfg.get('remat', 'none'))  # how to run it, not weights
    trunk_cfg = trunk.cfg
  gate = model_cfg.get('gate', 'dtt')  # runs from before the HRPO gate have no key
  hrpo = dict(hrpo_c=model_cfg.hrpo_c, hrpo_a_init=tuple(model_cfg.hrpo_a_init)) if gate == 'hrpo' else {}
  cfg = DTTConfig(trunk_cfg, gate_bias_init=model_cfg.gate_bias_init, use_projection=model_cfg.use_projection,
                  gate=gate, **hrpo)
  model = DTTModel(cfg, rngs=nnx.Rngs(seed), gpt2=trunk)
  if lora_cfg is not None and lora_cfg.enabled:
    lora.apply_lora(model.gpt2, lora.LoRAConfig.from_config(lora_cfg, trunk_cfg.family), nnx.Rngs(seed + 1))
    counts = lora.count_params(nnx.state(model, nnx.Param))
    log.info('LoRA rank %d on %s: %d adapter parameters of %d.', lora_cfg.rank, ', '.join(lora_cfg.targets),
             counts['lora'], counts['total'])
  return model
