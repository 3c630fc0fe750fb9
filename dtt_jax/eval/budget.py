"""Accuracy as a function of the reasoning budget (issue #28): one trained checkpoint evaluated at forced budgets.

    python -m dtt_jax.eval.budget --workdir=W --budgets=0,1,2,4,8 [--split=test] [--checkpoint=best] [--stage=grpo]

The budget k is what a method reasons with at inference (`config.eval.budget`): DTT's span positions before
`<|eot|>` is forced (`engine.generate`'s `think_budget`); the number of continuous thoughts (COCONUT) or pauses
(pause as thought, the Pause baseline) in the forced head. The run's own decoding (no budget) is evaluated too, as
the point the method chooses. Each budget's report goes into its own folder (`<workdir>/eval/<split>@budget<k>/`,
`heldout.output_dir`); the table (`budget.md`, `budget.json`) and the accuracy-vs-generated-tokens plot
(`budget.png`) into `<workdir>/eval/<split>@budgets/`. A method without a budget (CoT, No-CoT, iCoT, COCONUT w/o
thought) is refused, naming the methods that have one.
"""

from __future__ import annotations

import argparse
import json
import os

from dtt_jax import methods, pipeline
from dtt_jax import workdir as workdir_lib
from dtt_jax.data import coconut as coconut_data
from dtt_jax.eval import heldout

BUDGETED = coconut_data.BUDGETED + ('dtt',)


def stage_evaluated(config, workdir: str, stage: str = '') -> str:
  """The stage whose checkpoint is evaluated: `stage`, else the method's last stage with a checkpoint."""
  trained = [s for s in methods.get(config.method).stages
             if workdir_lib.checkpoint_steps(os.path.join(workdir, s))]
  if not trained:
    raise FileNotFoundError(f'{workdir} has no checkpoint of {", ".join(methods.get(config.method).stages)}: train '
                            'it first (python -m dtt_jax.main ...).')
  if stage and stage not in trained:
    raise ValueError(f'--stage={stage}: {workdir} has checkpoints of {", ".join(trained)} only.')
  return stage or trained[-1]


def metrics_path(workdir: str, split: str, stage: str, checkpoint: str, budget: int) -> str:
  return os.path.join(heldout.output_dir(workdir, split, stage, checkpoint, budget), 'metrics.json')


def evaluate_budgets(workdir: str, budgets, split: str = 'test', checkpoint: str = 'best', stage: str = '',
                     redo: bool = False) -> list[dict]:
  """Evaluates the run in `workdir` at each budget (and without one, budget -1) unless its report exists (or
  `redo`); returns one row per budget {budget, accuracy, generated_tokens, reasoning_tokens, num_examples}."""
  config = workdir_lib.load_run_config(workdir)
  if config.method not in BUDGETED:
    raise ValueError(f'config.method={config.method!r} of {workdir} has no reasoning budget to force (those with '
                     f'one: {", ".join(BUDGETED)}).')
  stage = stage_evaluated(config, workdir, stage)
  config.stage, config.eval.split, config.eval.checkpoint = 'eval', split, checkpoint
  config.eval.stages = (stage,)
  todo = [k for k in [-1, *budgets] if redo or not os.path.exists(metrics_path(workdir, split, stage, checkpoint, k))]
  if todo:
    with workdir_lib.hold(workdir):
      exp = pipeline.setup(config, workdir)
      method = methods.get(config.method)
      for k in todo:
        config.eval.budget = k
        method.evaluate(exp)
  rows = []
  for k in [-1, *budgets]:
    with open(metrics_path(workdir, split, stage, checkpoint, k)) as f:
      m = json.load(f)
    rows.append({'budget': k, 'accuracy': m['accuracy'], 'num_examples': m['num_examples'],
                 'generated_tokens': m.get('generated_tokens', m.get('completion_tokens')),
                 'reasoning_tokens': m['reasoning_tokens']})
  return rows


def write_report(rows: list[dict], out_dir: str, title: str) -> dict[str, str]:
  """budget.md (the table), budget.json (the rows) and budget.png (accuracy against generated tokens, each point
  labelled with its budget; the run's own decoding as an open marker) in `out_dir`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name) for name in ('budget.md', 'budget.json', 'budget.png')}
  lines = [f'{title}', '', '| budget | accuracy (%) | # generated tokens | # reasoning tokens | n |', '|---|---|---|---|---|']
  for r in rows:
    label = 'own' if r['budget'] < 0 else str(r['budget'])
    lines.append(f'| {label} | {100 * r["accuracy"]:.1f} | {r["generated_tokens"]:.1f} | '
                 f'{r["reasoning_tokens"]:.1f} | {r["num_examples"]} |')
  with open(paths['budget.md'], 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(paths['budget.json'], 'w') as f:
    json.dump(rows, f, indent=2)
  forced = sorted((r for r in rows if r['budget'] >= 0), key=lambda r: r['budget'])
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r['generated_tokens'] for r in forced], [100 * r['accuracy'] for r in forced], 'o-', label='forced budget')
  for r in forced:
    ax.annotate(str(r['budget']), (r['generated_tokens'], 100 * r['accuracy']), textcoords='offset points',
                xytext=(3, 3), fontsize=7)
  own = [r for r in rows if r['budget'] < 0]
  ax.plot([r['generated_tokens'] for r in own], [100 * r['accuracy'] for r in own], 'o', mfc='none', ms=9,
          label='own decoding')
  ax.set(xlabel='generated tokens (mean)', ylabel='accuracy (%)', title=title, ylim=(-2, 102))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(paths['budget.png'], dpi=100)
  plt.close(fig)
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a trained run')
  parser.add_argument('--budgets', required=True, help='comma-separated budgets >= 0, e.g. 0,1,2,4,8')
  parser.add_argument('--split', default='test', choices=heldout.SPLITS)
  parser.add_argument('--checkpoint', default='best', help="'best', 'latest' or a step")
  parser.add_argument('--stage', default='', help="the stage evaluated (default: the run's last)")
  parser.add_argument('--redo', action='store_true', help='evaluate again where a report exists')
  args = parser.parse_args(argv)
  try:
    budgets = [int(b) for b in args.budgets.split(',')]
  except ValueError:
    parser.error(f'--budgets={args.budgets!r}: expected comma-separated integers >= 0, e.g. 0,1,2,4,8.')
  if any(b < 0 for b in budgets):
    parser.error(f'--budgets={args.budgets!r}: budgets are >= 0.')
  rows = evaluate_budgets(args.workdir, budgets, args.split, args.checkpoint, args.stage, args.redo)
  out = os.path.join(args.workdir, 'eval', f'{args.split}@budgets')
  paths = write_report(rows, out, f'{args.workdir} on {args.split} at forced reasoning budgets')
  with open(paths['budget.md']) as f:
    print(f.read())
  print(f'Written: {", ".join(paths.values())}')


if __name__ == '__main__':
  main()
