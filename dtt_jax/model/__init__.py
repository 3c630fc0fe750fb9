"""GPT-2 (`gpt2.py`), HF checkpoint I/O (`hf_io.py`), the DTT gate module (`dtt.py`) and LoRA (`lora.py`)."""

from __future__ import annotations

import logging

from flax import nnx

from dtt_jax import tokens
from dtt_jax.model import hf_io, lora
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2Config

log = logging.getLogger(__name__)


def build_model(model_cfg, vocab: tokens.Vocab, seed: int = 0, lora_cfg=None) -> DTTModel:
  """From the `config.model` section: a fresh GPT-2 ('scratch') or pretrained weights (hub name or local HF dir)
  mapped into `vocab`, wrapped with the DTT gate (`model.gate`: 'dtt' or 'hrpo'). `lora_cfg` (the `config.lora`
  section): with `enabled`, LoRA adapters on its target projections (then only adapters and gate train)."""
  if model_cfg.init == 'scratch':
    gpt2 = None
    gpt2_cfg = GPT2Config(vocab_rows=vocab.num_rows, num_tokens=vocab.num_tokens, n_positions=model_cfg.n_positions,
                          n_embd=model_cfg.n_embd, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head,
                          dtype=model_cfg.dtype)
  else:
    gpt2 = hf_io.load_pretrained(model_cfg.init, vocab=vocab, dtype=model_cfg.dtype, seed=seed)
    gpt2_cfg = gpt2.cfg
  gate = model_cfg.get('gate', 'dtt')  # runs from before the HRPO gate have no key
  hrpo = dict(hrpo_c=model_cfg.hrpo_c, hrpo_a_init=tuple(model_cfg.hrpo_a_init)) if gate == 'hrpo' else {}
  cfg = DTTConfig(gpt2_cfg, gate_bias_init=model_cfg.gate_bias_init, use_projection=model_cfg.use_projection,
                  gate=gate, **hrpo)
  model = DTTModel(cfg, rngs=nnx.Rngs(seed), gpt2=gpt2)
  if lora_cfg is not None and lora_cfg.enabled:
    lora.apply_lora(model.gpt2, lora.LoRAConfig.from_config(lora_cfg), nnx.Rngs(seed + 1))
    counts = lora.count_params(nnx.state(model, nnx.Param))
    log.info('LoRA rank %d on %s: %d adapter parameters of %d.', lora_cfg.rank, ', '.join(lora_cfg.targets),
             counts['lora'], counts['total'])
  return model
