"""The latent lens (eval/evaluate.py) reads blended positions through the LM head in chunks: the same entries as
one pass, at exactly the positions whose gate is >= 0.5, each with the softmax's top tokens."""

import jax
import numpy as np

from configs import base
from dtt_jax import tokens
from dtt_jax.eval.evaluate import latent_lens
from dtt_jax.model import build_model


def test_chunks_give_the_entries_of_one_pass(hf_tokenizer):
  tokenizer = tokens.Tokenizer(hf_tokenizer)  # the full GPT-2 vocabulary
  cfg = base.get_config().model
  cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions = 1, 32, 2, 32
  model = build_model(cfg, tokenizer.vocab, seed=0)
  rng = np.random.RandomState(0)
  hidden = rng.randn(3, 6, 32).astype(np.float32)  # [N, T, D]
  gates = rng.uniform(size=(3, 6))
  mask = np.ones((3, 6), np.int32)
  mask[2, 4:] = 0
  whole = latent_lens(model, hidden, gates, mask, tokenizer)
  assert latent_lens(model, hidden, gates, mask, tokenizer, chunk=4) == whole
  expected = [[t for t in range(6) if gates[i, t] >= 0.5 and mask[i, t]] for i in range(3)]
  assert [[e['position'] for e in row] for row in whole] == expected and sum(map(len, expected)) > 4
  i, t = 0, expected[0][0]
  logits = np.asarray(jax.device_get(model.gpt2.logits(hidden[i, t][None])), np.float64)[0]
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  top = np.argsort(-probs)[:3]
  assert whole[i][0]['top'] == [[tokenizer.decode([int(v)]), round(float(probs[v]), 4)] for v in top]
