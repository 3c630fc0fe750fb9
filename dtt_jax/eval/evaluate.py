"""Greedy evaluation on held-out prompts: accuracy, structure rate, reasoning length, reward components, gates.

Used for validation in both stages and by the `eval` stage (which also writes reports, `eval/report.py`).
Generation is deterministic: greedy tokens and gate noise off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtt_jax import parallel, reward
from dtt_jax.data.answers import extract_answer
from dtt_jax.eval.compare import example_id
from dtt_jax.sampling import engine
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.tokens import Tokenizer


@dataclasses.dataclass
class EvalResult:
  metrics: dict[str, float]
  rows: list[dict]  # one per example: id, question, completion, answer, reference, correct, lengths, gates
  gates: dict[str, np.ndarray]  # 'inner' / 'outer': every gate value at those positions (for histograms)
  reasoning_lengths: np.ndarray  # [N]


def greedy_config(vocab, max_new_tokens: int, max_think: int, return_hidden: bool = False,
                  pinned_id: int = -1, pin_others: bool = False) -> engine.GenerateConfig:
  """Greedy decoding, gate noise off; `return_hidden` keeps the fed-back hidden states (for the latent lens);
  `pinned_id`: the token whose gate is 1 (`config.model.pin_latent`: `vocab.latent`), `pin_others`: every other
  token's 0 (`config.model.pin_text`)."""
  return engine.GenerateConfig(max_new_tokens=max_new_tokens, eos_id=vocab.eos, bot_id=vocab.bot, eot_id=vocab.eot,
                               sampling=SamplingConfig(greedy=True), max_think=max_think, gate_noise=False,
                               return_hidden=return_hidden, pinned_id=pinned_id, pin_others=pin_others)


def generate_all(model, prompt: np.ndarray, prompt_mask: np.ndarray, gen_cfg: engine.GenerateConfig, tau: float,
                 batch_size: int, mesh, key=None, think_budget: int | None = None) -> engine.Rollout:
  """Runs `engine.generate` over [N,P] prompts in fixed-size batches (the last padded by repeating rows, so nothing
  recompiles); returns the rollout fields for the N rows, as numpy. `think_budget` >= 0: `<|eot|>` forced after
  that many span positions in every row (`engine.generate`)."""
  n = prompt.shape[0]
  parallel.check_divisible(batch_size, mesh, 'generate.batch_size')
  key = jax.random.key(0) if key is None else key
  parts = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n
    batch = {'prompt': prompt[idx], 'mask': prompt_mask[idx]}
    if think_budget is not None:
      batch['budget'] = np.full((batch_size,), think_budget, np.int32)
    batch = parallel.to_global(batch, mesh)
    out = engine.generate(model, batch['prompt'], batch['mask'], jax.random.fold_in(key, start), tau, gen_cfg,
                          think_budget=batch.get('budget'))
    parts.append(parallel.to_host(out))
  keep = n - (len(parts) - 1) * batch_size
  parts[-1] = jax.tree.map(lambda x: x[:keep], parts[-1])
  return jax.tree.map(lambda *xs: np.concatenate(xs, 0), *parts)


def _stats(prefix: str, values: np.ndarray) -> dict[str, float]:
  if values.size == 0:
    return {f'{prefix}_{s}': 0.0 for s in ('mean', 'std', 'min', 'max')}
  return {f'{prefix}_mean': float(values.mean()), f'{prefix}_std': float(values.std()),
          f'{prefix}_min': float(values.min()), f'{prefix}_max': float(values.max())}


def latent_lens(model, hidden: np.ndarray, gates: np.ndarray, mask: np.ndarray, tokenizer: Tokenizer,
                top: int = 3, threshold: float = 0.5, chunk: int = 4096) -> list[list[dict]]:
  """COCONUT Figure-5-style probe: for each position whose input was mostly the previous hidden state
  (gate >= threshold), the `top` tokens the LM head reads from that hidden state.

  hidden [N,T,D] (h_{t-1}, fed into position t), gates, mask [N,T] -> per row a list of
  {position, gate, top: [[token text, probability], ...]}. The positions go through the LM head `chunk` at a time
  (a 40k-problem test split has ~10^6 of them: [10^6, V] logits at once took 18 GB).
  """
  rows, cols = np.nonzero((np.asarray(gates) >= threshold) & (np.asarray(mask) > 0))
  out = [[] for _ in range(hidden.shape[0])]
  for start in range(0, rows.size, chunk):
    r, c = rows[start:start + chunk], cols[start:start + chunk]
    logits = np.asarray(model.gpt2.logits(jnp.asarray(hidden[r, c])), np.float64)[:, :tokenizer.vocab.num_tokens]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    best = np.argsort(-probs, axis=-1)[:, :top]
    for k, (i, t) in enumerate(zip(r, c)):
      out[i].append({'position': int(t), 'gate': round(float(gates[i, t]), 4),
                     'top': [[tokenizer.decode([int(v)]), round(float(probs[k, v]), 4)] for v in best[k]]})
  return out


def evaluate(model, prompt: np.ndarray, prompt_mask: np.ndarray, questions: Sequence[str],
             references: Sequence[str], tokenizer: Tokenizer, dataset: str, gen_cfg: engine.GenerateConfig,
             tau: float, batch_size: int, mesh, reward_weights=None, answer_match: str = 'lenient',
             think_budget: int | None = None) -> EvalResult:
  """prompt, prompt_mask [N,P] -> EvalResult (greedy, gate noise off; answers scored by `answer_match`; a forced
  `think_budget` as `generate_all`'s). With `gen_cfg.return_hidden`, each row also carries its decoded tokens and
  the latent lens of its blended positions."""
  out = generate_all(model, prompt, prompt_mask, gen_cfg, tau, batch_size, mesh, think_budget=think_budget)
  lens = (latent_lens(model, out.hidden_inputs, out.gates, out.mask, tokenizer) if gen_cfg.return_hidden
          else None)
  completions = reward.decode_completions(tokenizer, out.tokens, out.mask)
  r = reward.compute_rewards(out.tokens, out.mask, out.gates, completions, list(references), dataset,
                             tokenizer.vocab, reward_weights, answer_match)
  inner, outer, _ = reward.span_masks(out.tokens, out.mask, tokenizer.vocab)
  gates = np.asarray(out.gates, np.float64)
  metrics = {
      'accuracy': float(np.mean(r['correct'])),
      'structure_rate': float(np.mean(r['structure_ok'])),
      'reasoning_tokens': float(np.mean(r['reasoning_length'])),
      'completion_tokens': float(np.mean(r['completion_length'])),
      'reward': float(np.mean(r['total'])),
      **{f'reward_{c}': float(np.mean(r[c])) for c in reward.COMPONENTS},
      **_stats('gate_inner', gates[inner]), **_stats('gate_outer', gates[outer]),
  }
  rows = []
  for i, text in enumerate(completions):
    real = np.asarray(out.mask[i]) > 0
    rows.append({
        'id': example_id(questions[i]), 'question': questions[i], 'completion': text, 'answer': extract_answer(text),
        'reference': references[i], 'correct': bool(r['correct'][i]), 'structure_ok': bool(r['structure_ok'][i]),
        'generated_tokens': int(r['completion_length'][i]), 'reasoning_tokens': int(r['reasoning_length'][i]),
        'gate_inner_mean': float(r['inner_gate_mean'][i]), 'gate_outer_mean': float(r['outer_gate_mean'][i]),
        'gates': [round(float(g), 4) for g in gates[i][real]],
    })
    if lens is not None:
      rows[-1]['tokens'] = [tokenizer.decode([int(t)]) for t in np.asarray(out.tokens[i])[real]]
      rows[-1]['latent_lens'] = lens[i]
  return EvalResult(metrics, rows, {'inner': gates[inner], 'outer': gates[outer]},
                    np.asarray(r['reasoning_length']))


def decoded_rows(model, out: engine.Rollout, tokenizer: Tokenizer, answer_of) -> list[dict]:
  """A rollout with its hidden states (numpy, from `generate_all`) -> per row the fields of the evaluation's rows:
  completion (specials included), answer (`answer_of(completion)`), tokens, gates, latent_lens (positions with gate
  >= 0.5), and forced (the positions of forced tokens: the budget's `<|eot|>`, a forced head)."""
  lens = latent_lens(model, out.hidden_inputs, out.gates, out.mask, tokenizer)
  rows = []
  for i, text in enumerate(reward.decode_completions(tokenizer, out.tokens, out.mask)):
    real = np.asarray(out.mask[i]) > 0
    rows.append({'completion': text, 'answer': answer_of(text),
                 'tokens': [tokenizer.decode([int(t)]) for t in np.asarray(out.tokens[i])[real]],
                 'gates': [round(float(g), 4) for g in np.asarray(out.gates[i])[real]],
                 'latent_lens': lens[i], 'forced': np.flatnonzero(np.asarray(out.forced[i])[real]).tolist()})
  return rows


@functools.partial(jax.jit, static_argnames=('graphdef', 'noisy_span_scale'))
def _teacher_forced_gates(graphdef, params, batch, tau, noisy_span_scale):
  model = nnx.merge(graphdef, params)
  out = engine.unroll(model, batch['prompt'], batch['prompt_mask'], batch['completion'],
                      jnp.zeros(batch['completion'].shape, jnp.float32), tau,
                      completion_key_bias=engine.noisy_span_bias(batch['filler_mask'], noisy_span_scale))
  mean = lambda m: jnp.sum(out.gates * m) / jnp.maximum(jnp.sum(m), 1)
  return {'tf_gate_inner': mean(batch['inner_mask']), 'tf_gate_outer': mean(batch['outer_mask'])}


def teacher_forced_gates(graphdef, params, batch, tau: float, noisy_span_scale: float) -> dict[str, float]:
  """Mean gate at inner / outer positions of a Stage-1 batch (every example with a span), noise off.

  Greedy generation after a 'none'-span bootstrap usually closes the span at once (no inner positions); these
  teacher-forced means show whether the gate opens inside a span at all.
  """
  fields = {k: batch[k] for k in ('prompt', 'prompt_mask', 'completion', 'filler_mask', 'inner_mask', 'outer_mask')}
  out = _teacher_forced_gates(graphdef, params, fields, jnp.float32(tau), noisy_span_scale)
  return {k: float(v) for k, v in jax.device_get(out).items()}
