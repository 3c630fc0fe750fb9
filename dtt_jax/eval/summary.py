"""The end-of-run summary: a few lines a person reads at a glance, and the training curves as a PNG.

`write_summary(workdir)` reads `<workdir>/metrics.jsonl` (the loop's records: `<stage>/loss`, `<stage>/tau`,
`<stage>/valid/<metric>`) and the evaluation's `metrics.json` files under `<workdir>/eval/`, and
  * returns (and prints) one line per trained stage with its last validation (accuracy, mean generated and
    reasoning tokens, mean inner / outer gate), then one line per evaluation;
  * writes the same text to `<workdir>/summary.txt`;
  * draws `<workdir>/eval/training_curves.png` (beside the evaluation's histograms): one row of panels per trained
    stage (loss, gate temperature tau, validation accuracy, reward and reasoning tokens, GRPO's mean rollout span
    length per step), matplotlib's Agg backend.
Stages are the prefixes that have a `<stage>/loss` record, in the order they first appear (`bootstrap`, `grpo`; any
other stage trained by the shared loop too). A stage that did not run has no line and no row; a metric a stage did
not log is shown as `-` and its panel says so. Records of a resumed run that repeat a step: the later one counts.
It never raises on missing or partial files (a workdir with nothing yet gives a one-line summary and no PNG).
"""

from __future__ import annotations

import glob
import json
import math
import os

CURVES = 'training_curves.png'
SUMMARY = 'summary.txt'
PANELS = (('loss', 'loss'), ('tau', 'gate temperature tau'), ('valid/accuracy', 'validation accuracy'),
          ('valid/reward', 'validation reward'), ('valid/reasoning_tokens', 'validation reasoning tokens'),
          ('reasoning_length', 'rollout span length'))
_LINE_METRICS = (('accuracy', 'accuracy {}', '.3f'), ('completion_tokens', 'tokens {}', '.1f'),
                 ('reasoning_tokens', 'reasoning {}', '.1f'), ('gate_inner_mean', 'gate inner {}', '.3f'),
                 ('gate_outer_mean', 'outer {}', '.3f'))


def read_curves(workdir: str) -> dict[str, dict[str, dict[int, float]]]:
  """{stage: {metric: {step: value}}} from `<workdir>/metrics.jsonl` (metric without the stage prefix, e.g. 'loss',
  'valid/accuracy'); unreadable lines are skipped."""
  curves: dict[str, dict[str, dict[int, float]]] = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return curves
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        step = int(record['step'])
      except (ValueError, KeyError, TypeError):
        continue
      for key, value in record.items():
        stage, _, metric = key.partition('/')
        if metric and isinstance(value, (int, float)) and stage != 'eval':
          curves.setdefault(stage, {}).setdefault(metric, {})[step] = float(value)
  return {stage: metrics for stage, metrics in curves.items() if 'loss' in metrics}


def read_evaluations(workdir: str) -> list[tuple[str, dict]]:
  """[(path relative to the workdir, metrics)] of every `metrics.json` under `<workdir>/eval/`, oldest first."""
  paths = glob.glob(os.path.join(workdir, 'eval', 'metrics.json'))
  paths += glob.glob(os.path.join(workdir, 'eval', '**', 'metrics.json'), recursive=True)
  out = []
  for path in sorted(set(paths), key=os.path.getmtime):
    try:
      with open(path) as f:
        metrics = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(metrics, dict):
      out.append((os.path.relpath(path, workdir), metrics))
  return out


def _fmt(value, spec: str) -> str:
  return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else '-'


def _values(metrics: dict) -> str:
  return ', '.join(label.format(_fmt(metrics.get(key), spec)) for key, label, spec in _LINE_METRICS)


def summary_lines(curves: dict, evaluations: list[tuple[str, dict]]) -> list[str]:
  """The summary's lines: one per trained stage (its last validation), one per evaluation."""
  lines = []
  width = max([len(s) for s in curves] + [4])
  for stage, metrics in curves.items():
    steps = max(metrics['loss'])
    valid = {k[len('valid/'):]: v for k, v in metrics.items() if k.startswith('valid/')}
    if valid:
      last = max(max(v) for v in valid.values())
      text = _values({k: v[last] for k, v in valid.items() if last in v})
      lines.append(f'{stage:<{width}}  {steps} steps, validation at step {last}: {text}')
    else:
      lines.append(f'{stage:<{width}}  {steps} steps, no validation')
  for path, metrics in evaluations:
    split = metrics.get('split', 'valid')
    what = f"{metrics.get('stage', '?')} on {metrics.get('num_examples', '?')} {split} examples"
    lines.append(f"{'eval':<{width}}  {what}: {_values(metrics)}  ({path})")
  return lines


def plot_curves(curves: dict, path: str) -> None:
  """One row of PANELS per stage; an x-axis of the stage's steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = len(curves)
  fig, axes = plt.subplots(rows, len(PANELS), figsize=(4 * len(PANELS), 2.8 * rows), squeeze=False)
  for row, (stage, metrics) in enumerate(curves.items()):
    for col, (key, title) in enumerate(PANELS):
      ax = axes[row][col]
      series = metrics.get(key, {})
      if series:
        steps = sorted(series)
        ax.plot(steps, [series[s] for s in steps], marker='o' if len(steps) < 20 else None, markersize=3)
      else:
        ax.text(0.5, 0.5, 'not logged', ha='center', va='center', transform=ax.transAxes, color='gray')
      ax.set_title(f'{stage}: {title}', fontsize=10)
      ax.set_xlabel('step')
      ax.ticklabel_format(axis='y', useOffset=False)  # a flat curve reads as its value, not as 1e-6 + offset
      ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_summary(workdir: str, echo: bool = True) -> str:
  """Summary text of the run in `workdir` (also `<workdir>/summary.txt`, printed when `echo`), and the training
  curves `<workdir>/eval/training_curves.png` when any stage trained."""
  curves, evaluations = read_curves(workdir), read_evaluations(workdir)
  lines = summary_lines(curves, evaluations) or [f'Nothing trained or evaluated yet in {workdir}.']
  if curves:
    png = os.path.join(workdir, 'eval', CURVES)
    os.makedirs(os.path.dirname(png), exist_ok=True)
    plot_curves(curves, png)
    lines.append(f'curves: {png}')
  text = '\n'.join(['Summary of ' + workdir] + lines) + '\n'
  if os.path.isdir(workdir):
    with open(os.path.join(workdir, SUMMARY), 'w') as f:
      f.write(text)
  if echo:
    print(text, end='', flush=True)
  return text
