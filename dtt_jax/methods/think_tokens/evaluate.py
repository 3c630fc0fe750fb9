"""How the thinking policy is scored on texts: next-token losses without thinking (the teacher; the policy with
thinking masked, both teacher-forced) and with thinking (`decode.interleaved_decode`), each over every real token
after the first and over the answer tokens; how often it thinks and with which ids; and the report
(metrics.json, think_histogram.png, samples.jsonl).

Every process computes the whole evaluation (inputs replicated over the mesh, results gathered with
`parallel.to_host`); only process 0 writes the report.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from dtt_jax import parallel
from dtt_jax.methods.think_tokens.data import Texts
from dtt_jax.methods.think_tokens.decode import eval_capacity, interleaved_jit
from dtt_jax.methods.think_tokens.policy import lm_logprobs_jit
from dtt_jax.model.gpt2 import GPT2Config

NUM_SAMPLES = 16  # decoded validation texts written to samples.jsonl


def think_stats(tokens: np.ndarray, mask: np.ndarray, vocab_rows: int, num_think: int) -> tuple[float, np.ndarray]:
  """tokens, mask [...] -> (thinking tokens / all tokens under mask, counts [K] of each thinking id)."""
  tokens, mask = np.asarray(tokens), np.asarray(mask) > 0
  think = tokens[mask & (tokens >= vocab_rows)] - vocab_rows
  counts = np.bincount(think, minlength=num_think)[:num_think].astype(np.int64)
  return float(think.size / max(int(mask.sum()), 1)), counts


@dataclasses.dataclass
class EvalResult:
  metrics: dict[str, float]
  counts: np.ndarray  # [K] uses of each thinking id
  rows: list[dict]  # decoded samples


def evaluate(teacher, policy, policy_cfg: GPT2Config, texts: Texts, max_think: int, temperature: float, key,
             tokenizer, mesh, batch_size: int = 64, num_samples: int = NUM_SAMPLES) -> EvalResult:
  """Next-token losses on `texts` without thinking (teacher; policy with thinking masked) and with thinking
  (`interleaved_decode`), each over every real token after the first and over the answer tokens; thinking
  frequency (thinking / all decoded tokens), thinking tokens per real token, count of each thinking id.
  teacher, policy: (graphdef, params) with the params on `mesh`."""
  vr, k = policy_cfg.vocab_rows, policy_cfg.extra_tokens
  capacity = eval_capacity(texts.max_len, max_think, policy_cfg.n_positions)
  eos = tokenizer.vocab.eos
  lps = {'teacher': [], 'no_think': [], 'think': []}
  feds, fed_masks = [], []
  for start in range(0, len(texts), batch_size):
    chunk = texts.take(np.arange(start, min(start + batch_size, len(texts))))
    key_data = np.asarray(jax.random.key_data(jax.random.fold_in(key, start)))
    tok, mask, lengths, key_data = parallel.replicate((chunk.tokens, chunk.mask(), chunk.lengths, key_data), mesh)
    out = interleaved_jit(*policy, tok, lengths, max_think, float(temperature), capacity, eos, key_data)
    out = parallel.to_host({'teacher': lm_logprobs_jit(*teacher, tok, mask),
                            'no_think': lm_logprobs_jit(*policy, tok, mask), 'think': out.target_logprob,
                            'fed': out.fed, 'fed_mask': out.fed_mask})
    for name, chunks in lps.items():
      chunks.append(out[name])
    feds.append(out['fed'])
    fed_masks.append(out['fed_mask'])
  position = np.arange(texts.max_len)[None]
  scored = (position >= 1) & (position < texts.lengths[:, None])  # [N,L]
  answer = (position >= texts.answer_start[:, None]) & (position < texts.lengths[:, None] - 1)
  metrics = {}
  for name, chunks in lps.items():
    lp = np.concatenate(chunks)
    metrics[f'loss_{name}'] = float(-lp[scored].mean())
    metrics[f'answer_loss_{name}'] = float(-lp[answer].mean()) if answer.any() else 0.0
  fed, fed_mask = np.concatenate(feds), np.concatenate(fed_masks)
  fed_mask[:, 0] = 0  # x_0 is given, not decoded
  frequency, counts = think_stats(fed, fed_mask, vr, k)
  metrics.update(think_frequency=frequency, think_per_token=float(counts.sum() / max(int(scored.sum()), 1)),
                 think_ids_used=float((counts > 0).sum()), num_sequences=float(len(texts)),
                 num_scored_tokens=float(scored.sum()))
  rows = [{'text': decode_with_thinking(fed[i][(fed_mask[i] > 0) | (np.arange(fed.shape[1]) == 0)], tokenizer, vr),
           'think_tokens': int(((fed[i] >= vr) & (fed_mask[i] > 0)).sum()), 'real_tokens': int(texts.lengths[i])}
          for i in range(min(num_samples, len(texts)))]
  return EvalResult(metrics, counts, rows)


def decode_with_thinking(ids, tokenizer, vocab_rows: int) -> str:
  """Model ids -> text with `<think_j>` for thinking ids."""
  out, run = [], []
  for i in np.asarray(ids).tolist():
    if i >= vocab_rows:
      if run:
        out.append(tokenizer.decode(run))
        run = []
      out.append(f'<think_{i - vocab_rows}>')
    else:
      run.append(i)
  if run:
    out.append(tokenizer.decode(run))
  return ''.join(out)


def write_report(result: EvalResult, out_dir: str, extra: dict | None = None) -> dict[str, str]:
  """metrics.json (with think_counts), think_histogram.png, samples.jsonl in out_dir -> {name: path}."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name) for name in ('metrics.json', 'think_histogram.png', 'samples.jsonl')}
  with open(paths['metrics.json'], 'w') as f:
    json.dump({**result.metrics, **(extra or {}), 'think_counts': result.counts.tolist()}, f, indent=2)
  with open(paths['samples.jsonl'], 'w') as f:
    for row in result.rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.bar(np.arange(len(result.counts)), result.counts, color='tab:cyan')
  ax.set(xlabel='thinking token id j (<think_j>)', ylabel='uses', xticks=np.arange(len(result.counts)),
         title=f'Thinking tokens used (frequency {result.metrics["think_frequency"]:.3f})')
  fig.tight_layout()
  fig.savefig(paths['think_histogram.png'], dpi=100)
  plt.close(fig)
  return paths
