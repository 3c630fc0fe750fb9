"""Evaluation reports in `<workdir>/eval/`: metrics.json, the per-example table (JSONL and CSV), PNG histograms of
gate values (inner vs outer) and of reasoning lengths, and optionally an .npz of gates per example."""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from dtt_jax.eval.evaluate import EvalResult

TABLE_COLUMNS = ('question', 'completion', 'answer', 'reference', 'correct', 'structure_ok', 'reasoning_length',
                 'gate_inner_mean', 'gate_outer_mean', 'gates')


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
    writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
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

  if artifacts:
    paths['artifacts.npz'] = os.path.join(out_dir, 'artifacts.npz')
    np.savez_compressed(paths['artifacts.npz'], **artifacts)
  return paths
