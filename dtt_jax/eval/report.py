"""Evaluation reports in an output folder: metrics.json, the per-example table (JSONL and CSV), PNG histograms of
gate values (inner vs outer) and of reasoning lengths, the gate at every position of a few examples drawn over their
tokens with the latent lens of the blended positions, and optionally an .npz of gates per example."""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from dtt_jax.eval.evaluate import EvalResult

TABLE_COLUMNS = ('id', 'question', 'completion', 'answer', 'reference', 'correct', 'structure_ok', 'generated_tokens',
                 'reasoning_tokens', 'gate_inner_mean', 'gate_outer_mean', 'gates')


def write_report(result: EvalResult, out_dir: str, extra_metrics: dict | None = None,
                 artifacts: dict[str, np.ndarray] | None = None) -> dict[str, str]:
  """Writes every report file; returns {kind: path}."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name) for name in (
      'metrics.json', 'completions.jsonl', 'completions.csv', 'gate_histogram.png', 'reasoning_lengths.png')}
  with open(paths['metrics.json'], 'w') as f:
    json.dump({**result.metrics, **(extra_metrics or {}), 'num_examples': len(result.rows)}, f, indent=2)
  with open(paths['completions.jsonl'], 'w') as f:
    for row in result.rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  with open(paths['completions.csv'], 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction='ignore')
    writer.writeheader()
    for row in result.rows:
      writer.writerow({**row, 'gates': ' '.join(f'{g:.3f}' for g in row['gates'])})

  fig, ax = plt.subplots(figsize=(6, 4))
  bins = np.linspace(0.0, 1.0, 41)
  for name, color in (('inner', 'tab:blue'), ('outer', 'tab:orange')):
    values = result.gates[name]
    ax.hist(values, bins=bins, alpha=0.6, color=color, label=f'{name} (n={len(values)})')
  ax.set(xlabel='gate value g', ylabel='positions', title='Gate values inside vs outside <|bot|>...<|eot|>')
  ax.set_yscale('log')
  ax.legend()
  fig.tight_layout()
  fig.savefig(paths['gate_histogram.png'], dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  lengths = result.reasoning_lengths
  ax.hist(lengths, bins=np.arange(0, max(int(lengths.max(initial=0)), 1) + 2) - 0.5, color='tab:green')
  ax.set(xlabel='tokens between <|bot|> and <|eot|>', ylabel='examples', title='Reasoning length')
  fig.tight_layout()
  fig.savefig(paths['reasoning_lengths.png'], dpi=100)
  plt.close(fig)

  if result.rows and 'tokens' in result.rows[0]:
    paths['gates_over_tokens.png'] = os.path.join(out_dir, 'gates_over_tokens.png')
    plot_gates_over_tokens(result.rows, paths['gates_over_tokens.png'])
  if artifacts:
    paths['artifacts.npz'] = os.path.join(out_dir, 'artifacts.npz')
    np.savez_compressed(paths['artifacts.npz'], **artifacts)
  return paths


def plot_gates_over_tokens(rows: list[dict], path: str, examples: int = 4) -> None:
  """The gate value at every completion position of a few examples (those with the longest reasoning span first),
  drawn over the decoded tokens; above each blended position (a `latent_lens` entry) the LM head's top token for
  the hidden state fed in there, with its probability."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  chosen = sorted(rows, key=lambda r: -r.get('reasoning_tokens', 0))[:examples]
  width = max(len(r['tokens']) for r in chosen)
  fig, axes = plt.subplots(len(chosen), 1, figsize=(max(6, 0.35 * width + 1), 2.4 * len(chosen)), squeeze=False)
  for ax, row in zip(axes[:, 0], chosen):
    x = np.arange(len(row['tokens']))
    ax.bar(x, row['gates'], color=['tab:blue' if g >= 0.5 else 'tab:gray' for g in row['gates']])
    ax.set_xticks(x, [repr(t)[1:-1] for t in row['tokens']], rotation=90, fontsize=7)
    ax.set(ylim=(0, 1.35), ylabel='gate', title=f"{row['question']}  ({'correct' if row['correct'] else 'wrong'})")
    ax.title.set_fontsize(9)
    for lens in row.get('latent_lens', []):
      word, prob = lens['top'][0]
      ax.text(lens['position'], min(lens['gate'], 1.0) + 0.03, f'{repr(word)[1:-1]} {prob:.2f}', rotation=90,
              ha='center', va='bottom', fontsize=6, color='tab:red')
  fig.suptitle('Gate per position (blue: input mostly the previous hidden state; red: latent lens top token)',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
