"""GPT-2 (`gpt2.py`), HF checkpoint I/O (`hf_io.py`) and the DTT gate module (`dtt.py`)."""

from __future__ import annotations

from flax import nnx

from dtt_jax import tokens
from dtt_jax.model import hf_io
from dtt_jax.model.dtt import DTTConfig, DTTModel
from dtt_jax.model.gpt2 import GPT2Config


def build_model(model_cfg, vocab: tokens.Vocab, seed: int = 0) -> DTTModel:
  """From the `config.model` section: a fresh GPT-2 ('scratch') or pretrained weights (hub name or local HF dir)
  mapped into `vocab`, wrapped with the DTT gate head."""
  if model_cfg.init == 'scratch':
    gpt2 = None
    gpt2_cfg = GPT2Config(vocab_rows=vocab.num_rows, num_tokens=vocab.num_tokens, n_positions=model_cfg.n_positions,
                          n_embd=model_cfg.n_embd, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head,
                          dtype=model_cfg.dtype)
  else:
    gpt2 = hf_io.load_pretrained(model_cfg.init, vocab=vocab, dtype=model_cfg.dtype, seed=seed)
    gpt2_cfg = gpt2.cfg
  cfg = DTTConfig(gpt2_cfg, gate_bias_init=model_cfg.gate_bias_init, use_projection=model_cfg.use_projection)
  return DTTModel(cfg, rngs=nnx.Rngs(seed), gpt2=gpt2)
