"""The COCONUT-style study table (issue #9): `python -m dtt_jax.eval.study --root=runs/study --output=docs/study.md`.

Reads every `<root>/<dataset>_<method>/` run of `launch/reproduce.sh` (its `eval/<split>/<stage>/metrics.json` and
`config.json`) and writes a markdown table like COCONUT's Table 1: accuracy (%) and mean number of generated tokens
per method and dataset, next to the paper's figures, plus the per-stage validation of the curriculum runs
(`metrics.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os

DATASETS = ('prontoqa', 'prosqa')
METHODS = ('cot', 'no_cot', 'pause', 'pause_as_thought', 'coconut_no_curriculum', 'coconut', 'dtt')
LABELS = {'cot': 'CoT', 'no_cot': 'No-CoT', 'pause': 'Pause token', 'pause_as_thought': 'Pause as thought',
          'coconut_no_curriculum': 'COCONUT w/o curriculum', 'coconut': 'COCONUT', 'dtt': 'DTT (bootstrap + GRPO)'}
# COCONUT (arXiv:2412.06769) Table 1 (seed 004), pretrained GPT-2: (accuracy %, # tokens).
PAPER = {
    'prontoqa': {'cot': (98.8, 92.5), 'no_cot': (93.8, 3.0), 'pause': (77.7, 3.0), 'pause_as_thought': (100.0, 3.0),
                 'coconut_no_curriculum': (52.4, 9.0), 'coconut': (99.8, 9.0)},
    'prosqa': {'cot': (77.5, 49.4), 'no_cot': (76.7, 8.2), 'pause': (75.9, 8.2), 'pause_as_thought': (96.6, 8.2),
               'coconut_no_curriculum': (76.1, 14.2), 'coconut': (97.0, 14.2)},
}


def load_run(workdir: str) -> dict | None:
  """{accuracy (0-1), tokens, num_examples} of a finished run, None when it has no evaluation."""
  found = [os.path.join(workdir, 'eval', split, stage, 'metrics.json') for split in ('test', 'valid')
           for stage in ('grpo', 'bootstrap')]  # the held-out split first, the last stage first
  path = next((p for p in found if os.path.exists(p)), None)
  if path is None:
    return None
  with open(path) as f:
    m = json.load(f)
  tokens = m['generated_tokens'] if 'generated_tokens' in m else m['completion_tokens']  # DTT's evaluation
  return {'accuracy': m['accuracy'], 'tokens': tokens, 'num_examples': m['num_examples']}


def stage_curve(workdir: str) -> list[dict]:
  """Validation rows of a curriculum run: step, stage, accuracy, tf_token_accuracy, tf_sequence_accuracy."""
  rows = []
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if 'bootstrap/valid/stage' in r:
          rows.append({'step': r['step'], **{k: r[f'bootstrap/valid/{k}'] for k in (
              'stage', 'accuracy', 'generated_tokens', 'tf_token_accuracy', 'tf_sequence_accuracy')}})
  return rows


def render(root: str, command: str) -> str:
  lines = ['| Method | ' + ' | '.join(f'{d} acc. (%) | {d} # tokens | paper {d}' for d in DATASETS) + ' |',
           '|---|' + '---|---|---|' * len(DATASETS)]
  for method in METHODS:
    cells = []
    for d in DATASETS:
      run = load_run(os.path.join(root, f'{d}_{method}'))
      paper = PAPER[d].get(method)
      cells += ([f'{100 * run["accuracy"]:.1f}', f'{run["tokens"]:.1f}'] if run else ['not run', ''])
      cells.append(f'{paper[0]:.1f} / {paper[1]:.1f}' if paper else '—')
    lines.append(f'| {LABELS[method]} | ' + ' | '.join(cells) + ' |')
  out = [f'Command: `{command.strip()}`', '', *lines]
  curve = stage_curve(os.path.join(root, 'addition_coconut'))
  if curve:
    out += ['', 'Addition curriculum (COCONUT, 2-digit, stage 0 = text CoT, then 1-3 steps latent; validation at '
            'the end of each stage):', '',
            '| step | stage | generated acc. (%) | # tokens | teacher-forced token acc. (%) | teacher-forced sequence '
            'acc. (%) |', '|---|---|---|---|---|---|']
    out += [f'| {r["step"]} | {int(r["stage"])} | {100 * r["accuracy"]:.1f} | {r["generated_tokens"]:.1f} | '
            f'{100 * r["tf_token_accuracy"]:.1f} | {100 * r["tf_sequence_accuracy"]:.1f} |' for r in curve]
  return '\n'.join(out) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', default='runs/study', help='directory of the <dataset>_<method> workdirs')
  parser.add_argument('--output', default='', help='markdown file to write (default: print)')
  parser.add_argument('--command', default='launch/reproduce.sh', help='the command that produced the runs')
  args = parser.parse_args(argv)
  text = render(args.root, args.command)
  if args.output:
    with open(args.output, 'w') as f:
      f.write(text)
  print(text)


if __name__ == '__main__':
  main()
