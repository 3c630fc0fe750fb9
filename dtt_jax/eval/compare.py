"""Paired comparison of evaluations of the same examples (issue #17).

    python -m dtt_jax.eval.compare DIR_A DIR_B [DIR_C ...] [--out FILE]

Each DIR is an evaluation output directory (e.g. `runs/x/eval`) holding `completions.jsonl`, one JSON object per
example with at least
    id                str   stable example id: `example_id(question)` (the evaluation stamps it on every row)
    correct           bool
    generated_tokens  int   completion tokens generated
    reasoning_tokens  int   tokens between <|bot|> and <|eot|> (0 for methods without a span)
and optionally `metrics.json` whose `method`, `stage` and `step` label the run (else the directory as given).

Rows are joined by id; the runs must hold the same set of ids (else a ValueError naming both directories and how
many ids only each has), and an id may appear once per file (else an error naming the file and both lines).
The first DIR is the baseline: every other run is paired with it. For each run the markdown table gives the
accuracy with its 95% Wilson interval, the mean generated and reasoning tokens, and against the baseline: examples
gained (wrong in the baseline, right here), lost (right in the baseline, wrong here) and the exact McNemar p-value
(two-sided binomial test of the b lost vs c gained discordant pairs:
p = min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c)), 1 when b + c = 0).

Standard library only, so the evaluation can import `example_id` cheaply.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence

COMPLETIONS = 'completions.jsonl'
METRICS = 'metrics.json'
REQUIRED = {'id': str, 'correct': bool, 'generated_tokens': int, 'reasoning_tokens': int}
Z_95 = 1.959963984540054  # standard normal quantile 0.975


def example_id(question: str) -> str:
  """Stable id of an example: the first 16 hex digits of sha256(question as UTF-8)."""
  return hashlib.sha256(question.encode('utf-8')).hexdigest()[:16]


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (95% for the default z); (0, 1) when n = 0."""
  if not 0 <= successes <= n:
    raise ValueError(f'Need 0 <= successes <= n, got successes={successes}, n={n}.')
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  z2 = z * z
  denom = 1 + z2 / n
  center = (p + z2 / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact_p(b: int, c: int) -> float:
  """Exact two-sided McNemar p-value of b and c discordant pairs (binomial(b + c, 1/2)); 1 when b + c = 0."""
  if b < 0 or c < 0:
    raise ValueError(f'Discordant counts must be >= 0, got b={b}, c={c}.')
  n = b + c
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
  return min(1.0, 2 * tail / 2**n)  # exact integers; one rounding in the division


def _check_row(row, where: str) -> dict:
  if not isinstance(row, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(row).__name__}.')
  for key, kind in REQUIRED.items():
    if key not in row:
      raise ValueError(f'{where}: field {key!r} is missing (each row needs {", ".join(REQUIRED)}).')
    value = row[key]
    if kind is int:
      ok, want = isinstance(value, int) and not isinstance(value, bool) and value >= 0, 'an int >= 0'
    else:
      ok, want = isinstance(value, kind), f'a {kind.__name__}'
    if not ok:
      raise ValueError(f'{where}: field {key!r} = {value!r} is not {want}.')
  return row


def load_rows(path: str) -> dict[str, dict]:
  """id -> row of `path`/completions.jsonl (or of `path` when it is the file), in file order. Raises
  FileNotFoundError when absent, ValueError naming the file and line for bad JSON, a missing or mistyped field, a
  duplicate id (and the line that had it first) or a file without rows."""
  file = path if os.path.isfile(path) else os.path.join(path, COMPLETIONS)
  if not os.path.isfile(file):
    raise FileNotFoundError(f'{file} is missing: give an evaluation output directory (e.g. runs/x/eval).')
  rows, first_line = {}, {}
  with open(file, encoding='utf-8') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{file}:{line_no}'
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not valid JSON ({e.msg}).') from e
      row = _check_row(row, where)
      if row['id'] in rows:
        raise ValueError(f'{where}: duplicate id {row["id"]!r} (first at line {first_line[row["id"]]}); each '
                         'example must appear once.')
      rows[row['id']] = row
      first_line[row['id']] = line_no
  if not rows:
    raise ValueError(f'{file} has no rows.')
  return rows


def run_label(path: str) -> str:
  """'method stage step N' from `path`/metrics.json (the fields it has), else `path` as given."""
  metrics_path = os.path.join(path, METRICS)
  if os.path.isdir(path) and os.path.isfile(metrics_path):
    with open(metrics_path, encoding='utf-8') as f:
      metrics = json.load(f)
    parts = [str(metrics[k]) for k in ('method', 'stage') if metrics.get(k) not in (None, '')]
    if metrics.get('step') is not None:
      parts.append(f'step {metrics["step"]}')
    if parts:
      return ' '.join(parts)
  return path.rstrip('/') or path


@dataclasses.dataclass(frozen=True)
class Run:
  label: str
  path: str
  rows: dict[str, dict]  # id -> row


def load_run(path: str) -> Run:
  return Run(run_label(path), path, load_rows(path))


def check_same_examples(a: Run, b: Run) -> None:
  """Raises ValueError naming both directories and the count of ids only in each unless their id sets match."""
  only_a = sorted(a.rows.keys() - b.rows.keys())
  only_b = sorted(b.rows.keys() - a.rows.keys())
  if only_a or only_b:
    example = (only_a or only_b)[0]
    raise ValueError(f'{a.path} and {b.path} hold different example sets: {len(only_a)} ids only in {a.path}, '
                     f'{len(only_b)} ids only in {b.path} (e.g. {example!r}); compare evaluations of the same '
                     'examples.')


def compare(runs: Sequence[Run]) -> list[dict]:
  """One table row per run (the first is the baseline): label, path, n, correct, accuracy, ci_low, ci_high,
  generated_tokens, reasoning_tokens (means) and, against the baseline, gained, lost, p_value (None for the
  baseline's own row)."""
  if len(runs) < 2:
    raise ValueError(f'Need at least 2 runs to compare, got {len(runs)}.')
  base = runs[0]
  for run in runs[1:]:
    check_same_examples(base, run)
  ids = list(base.rows)
  table = []
  for k, run in enumerate(runs):
    correct = sum(run.rows[i]['correct'] for i in ids)
    low, high = wilson_interval(correct, len(ids))
    row = dict(label=run.label, path=run.path, n=len(ids), correct=correct, accuracy=correct / len(ids),
               ci_low=low, ci_high=high,
               generated_tokens=sum(run.rows[i]['generated_tokens'] for i in ids) / len(ids),
               reasoning_tokens=sum(run.rows[i]['reasoning_tokens'] for i in ids) / len(ids),
               gained=None, lost=None, p_value=None)
    if k > 0:
      row['gained'] = sum(run.rows[i]['correct'] and not base.rows[i]['correct'] for i in ids)
      row['lost'] = sum(base.rows[i]['correct'] and not run.rows[i]['correct'] for i in ids)
      row['p_value'] = mcnemar_exact_p(row['lost'], row['gained'])
    table.append(row)
  return table


def _dedupe_labels(runs: list[Run]) -> list[Run]:
  counts = {}
  for run in runs:
    counts[run.label] = counts.get(run.label, 0) + 1
  return [dataclasses.replace(run, label=f'{run.label} ({run.path})') if counts[run.label] > 1 else run
          for run in runs]


def to_markdown(table: Sequence[dict]) -> str:
  """The rows of `compare` as a markdown table, headed by the example count and the baseline."""
  base = table[0]
  against = 'each run against the baseline' if len(table) > 2 else 'against the baseline'
  lines = [f'Paired comparison on {base["n"]} examples (joined by id); gained / lost / McNemar p: {against}, '
           f'{base["label"]} (first row).', '',
           f'| run | accuracy [95% Wilson CI] | generated tokens | reasoning tokens | gained vs {base["label"]} '
           f'| lost vs {base["label"]} | McNemar p (exact) |',
           '|---|---|---:|---:|---:|---:|---:|']
  for row in table:
    paired = ('baseline', '', '') if row['p_value'] is None else (
        str(row['gained']), str(row['lost']), f'{row["p_value"]:.3g}')
    lines.append(f'| {row["label"]} | {row["accuracy"]:.3f} [{row["ci_low"]:.3f}, {row["ci_high"]:.3f}] '
                 f'({row["correct"]}/{row["n"]}) | {row["generated_tokens"]:.1f} | {row["reasoning_tokens"]:.1f} '
                 f'| {" | ".join(paired)} |')
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dtt_jax.eval.compare', description=__doc__.splitlines()[0])
  parser.add_argument('dirs', nargs='+', metavar='DIR',
                      help='evaluation output directories (completions.jsonl); the first is the baseline')
  parser.add_argument('--out', default='', help='also write the markdown table to this file')
  args = parser.parse_args(argv)
  if len(args.dirs) < 2:
    parser.error('give at least two evaluation directories (the first is the baseline).')
  try:
    markdown = to_markdown(compare(_dedupe_labels([load_run(d) for d in args.dirs])))
  except (OSError, ValueError) as e:
    print(f'compare: error: {e}', file=sys.stderr)
    return 1
  print(markdown, end='')
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
      f.write(markdown)
  return 0


if __name__ == '__main__':
  sys.exit(main())
