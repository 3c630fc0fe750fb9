"""COCONUT's training loss through the generation engine (seed 004; COCONUT arXiv:2412.06769 §3).

The completion is teacher-forced with the engine's step and KV cache (`engine.unroll`), the gate forced to 1 at
`<|latent|>` positions (the input is exactly the previous position's last hidden state, no token embedding) and
to 0 elsewhere, so one recurrent pass replaces COCONUT's n + 1 full forward passes; the gradient flows through
the continuous thoughts. Cross-entropy covers `loss_mask` (the text after the latent span).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from dtt_jax.model.dtt import DTTModel
from dtt_jax.sampling import engine


def coconut_loss(model: DTTModel, batch) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """batch (`data.coconut.build_batch`): prompt, prompt_mask [B,P]; completion, loss_mask, latent_mask [B,T]
  -> (mean CE over loss_mask, metrics)."""
  completion = batch['completion']
  out = engine.unroll(model, batch['prompt'], batch['prompt_mask'], completion,
                      jnp.zeros(completion.shape, jnp.float32), 1.0, forced_gates=batch['latent_mask'])
  logits = model.gpt2.logits(out.target_hidden)  # [B,T,V]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, completion)
  count = jnp.maximum(jnp.sum(batch['loss_mask']), 1).astype(jnp.float32)
  ce = jnp.sum(nll * batch['loss_mask']) / count
  correct = (jnp.argmax(logits, -1) == completion) * batch['loss_mask']
  return ce, {'ce': ce, 'token_accuracy': jnp.sum(correct) / count}
