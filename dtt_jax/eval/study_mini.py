"""The CPU-scale method study (issue #18): every method x task x seed, then `docs/study_mini.md`.

    python -m dtt_jax.eval.study_mini --jobs=2                # runs/study_mini -> docs/study_mini.md
    python -m dtt_jax.eval.study_mini --jobs=2 --scale=long   # runs/study_mini_long -> docs/study_mini_long.md

Each run is `python -m dtt_jax.main --config=configs/coconut.py:<task>,<method>[,long] --config.seed=<seed>
--config.eval.split=test` in `<root>/<task>/<method>/seed<seed>/`: every method of a task gets the same model, data,
batch and supervised steps (configs/coconut.py); DTT adds its GRPO steps (stated in the table). The methods that
leave the text chain (`FROM_COT`: the COCONUT family, iCoT, DTT) start from the same seed's CoT run at the end of
its text stage (`--config.init_from`, as the paper's GSM8K recipe) and train the rest of the schedule, so the
steps of that shared stage count in their budget. A run that finished (its test evaluation written) is not run
again; an interrupted one resumes from its checkpoints and its wall time adds up over the attempts
(`study_run.json`). `--jobs=N` runs N at a time, each pinned to its own CPU. Every finished run's results go into
a ledger committed beside the report (`docs/study_mini_runs.json`), and the report is rendered from it, so the
figures outlive the run directories; `--render_only` writes the report from the ledger and the runs found.

The report: per task, accuracy on the test split (mean ± std over the seeds that finished), mean generated tokens,
mean training + evaluation wall time, and a plot of accuracy against generated tokens (one point per method, the
seed spread as error bars) next to the markdown file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import subprocess
import sys
import time

import numpy as np

from dtt_jax.eval import heldout
from dtt_jax.workdir import checkpoint_steps

TASKS = ('addition2', 'addition3', 'addition4', 'prosqa_mini', 'prontoqa', 'prosqa')
DEFAULT_TASKS = TASKS[:4]  # the real ProntoQA / ProsQA files: `--tasks`, at their current budget
METHODS = ('no_cot', 'cot', 'icot', 'pause', 'pause_as_thought', 'coconut_no_curriculum', 'coconut_no_thought',
           'coconut', 'dtt')
LABELS = {'cot': 'CoT', 'no_cot': 'No-CoT', 'icot': 'iCoT', 'pause': 'Pause token',
          'pause_as_thought': 'Pause as thought', 'coconut_no_curriculum': 'COCONUT w/o curriculum',
          'coconut_no_thought': 'COCONUT w/o thought', 'coconut': 'COCONUT', 'dtt': 'DTT (bootstrap + GRPO)'}
FROM_COT = ('icot', 'pause_as_thought', 'coconut_no_curriculum', 'coconut_no_thought', 'coconut', 'dtt')
# Their layout changes over training, so the checkpoint best on validation may be an earlier stage's: their last
# checkpoint (the final stage, every step latent or removed) is scored too, in eval/test@latest/.
FINAL_LAYOUT = ('icot', 'pause_as_thought', 'coconut_no_thought', 'coconut')
SEEDS = (0, 1, 2)
RUN_FILE = 'study_run.json'  # {wall_s, attempts, command, returncode}


def workdir(root: str, task: str, method: str, seed: int) -> str:
  return os.path.join(root, task, method, f'seed{seed}')


def config_arg(task: str, method: str, scale: str = '') -> str:
  """The `configs/coconut.py` argument of a run (`scale`: '' or 'long', its schedule)."""
  return f'{task},{method}' + (f',{scale}' if scale else '')


def text_stage_steps(task: str) -> int:
  """Steps of the task's text stage (stage 0, CoT, the same at every scale), which the `FROM_COT` methods take from
  the CoT run."""
  from configs import coconut as coconut_configs  # pylint: disable=g-import-not-at-top
  k = coconut_configs.get_config(f'{task},cot').coconut
  return k.first_stage_epochs * k.steps_per_epoch


def starts_from_cot(task: str, method: str) -> bool:
  """Whether the run starts from its CoT run's text stage (a `FROM_COT` method on a task with a text stage)."""
  return method in FROM_COT and text_stage_steps(task) > 0


def command(task: str, method: str, seed: int, root: str, overrides=(), scale: str = '') -> list[str]:
  """The run's command line: the CoT run keeps every checkpoint (the others start from the one ending its text
  stage); a `FROM_COT` method starts there and trains the rest of the schedule."""
  from configs import coconut as coconut_configs  # pylint: disable=g-import-not-at-top
  extra = []
  if method == 'cot':
    extra = ['--config.bootstrap.keep_checkpoints=1000']
  elif starts_from_cot(task, method):
    c = coconut_configs.get_config(config_arg(task, method, scale))
    text = c.coconut.first_stage_epochs * c.coconut.steps_per_epoch
    extra = [f'--config.init_from={workdir(root, task, "cot", seed)}', f'--config.init_checkpoint={text}']
    if method == 'dtt':
      extra.append(f'--config.bootstrap.steps={c.bootstrap.steps - text}')
    else:
      extra.append(f'--config.coconut.start_epoch={c.coconut.first_stage_epochs}')
  return [sys.executable, '-m', 'dtt_jax.main', f'--config=configs/coconut.py:{config_arg(task, method, scale)}',
          f'--workdir={workdir(root, task, method, seed)}', f'--config.seed={seed}', '--config.eval.split=test',
          *extra, *overrides]


def test_metrics(out: str, checkpoint: str = 'best') -> dict | None:
  """The test-split metrics of a finished run (DTT: its last stage), None before its evaluation; `checkpoint`
  'latest': those of its last checkpoint (`FINAL_LAYOUT`)."""
  for stage in ('grpo', 'bootstrap'):
    path = os.path.join(heldout.output_dir(out, 'test', stage, checkpoint), 'metrics.json')
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  return None


def _execute(cmd: list[str], out: str, cpu: int | None) -> tuple[int, float]:
  """(exit code, seconds) of `cmd`, pinned to `cpu` when given, its output appended to `<out>.log`."""
  start = time.time()
  with open(out + '.log', 'a') as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    if cpu is not None:
      os.sched_setaffinity(proc.pid, {cpu})  # before it starts its thread pools
    return proc.wait(), time.time() - start


def run_one(task: str, method: str, seed: int, root: str, overrides=(), cpu: int | None = None,
            scale: str = '') -> dict:
  """Trains and evaluates one run (unless finished), pinned to `cpu` when given, then (`FINAL_LAYOUT`) scores its
  last checkpoint too; its log next to the workdir, its wall time in RUN_FILE."""
  out = workdir(root, task, method, seed)
  record_path = os.path.join(out, RUN_FILE)
  record = {'wall_s': 0.0, 'attempts': 0}
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
  cmd = command(task, method, seed, root, overrides, scale)
  if test_metrics(out) is None or record.get('returncode') != 0:
    os.makedirs(out, exist_ok=True)
    returncode, seconds = _execute(cmd, out, cpu)
    record = {'wall_s': record['wall_s'] + seconds, 'attempts': record['attempts'] + 1,
              'command': ' '.join(cmd[1:]), 'returncode': returncode,
              'cpus': 1 if cpu is not None else len(os.sched_getaffinity(0))}
  if record['returncode'] == 0 and method in FINAL_LAYOUT and test_metrics(out, 'latest') is None:
    final = cmd + ['--config.stage=eval', '--config.eval.checkpoint=latest']
    returncode, seconds = _execute(final, out, cpu)
    record.update(wall_s=record['wall_s'] + seconds, final_command=' '.join(final[1:]), returncode=returncode)
  with open(record_path, 'w') as f:
    json.dump(record, f, indent=2)
  return record


def run_all(runs, root: str, overrides=(), jobs: int = 1, scale: str = '') -> None:
  """Every (task, method, seed) of `runs`, `jobs` at a time (each on its own CPU when there are that many), a
  `FROM_COT` run once its CoT run has finished (skipped when that one failed)."""
  cpus = sorted(os.sched_getaffinity(0))
  slots = queue.Queue()
  for i in range(jobs):
    slots.put(cpus[i] if len(cpus) >= jobs > 1 else None)

  def job(task, method, seed):
    cpu = slots.get()
    try:
      return run_one(task, method, seed, root, overrides, cpu, scale)
    finally:
      slots.put(cpu)

  needs = {(t, m, s): (t, 'cot', s) if starts_from_cot(t, m) else None for t, m, s in runs}
  pending, running, ok, failed = list(runs), {}, set(), set()
  for cot in set(needs.values()) - set(runs) - {None}:  # CoT runs of an earlier call
    (ok if test_metrics(workdir(root, *cot)) is not None else failed).add(cot)
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    while pending or running:
      for run in list(pending):
        task, method, seed = run
        if needs[run] in failed:
          pending.remove(run)
          failed.add(run)
          print(f'{task} {method} seed {seed}: skipped, its CoT run failed', flush=True)
        elif (needs[run] is None or needs[run] in ok) and len(running) < jobs:
          pending.remove(run)
          running[pool.submit(job, *run)] = run
      done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        run, record = running.pop(future), future.result()
        (ok if record['returncode'] == 0 else failed).add(run)
        print(f'{run[0]} {run[1]} seed {run[2]}: {record["wall_s"]:.0f} s, exit {record["returncode"]}', flush=True)


def collect(root: str, tasks, methods, seeds) -> dict:
  """{(task, method, seed): {accuracy, tokens, wall_s, num_examples, steps, grpo_steps, final_accuracy,
  final_tokens}} of the finished runs in `root` (final_*: the last checkpoint's, `FINAL_LAYOUT`, else None)."""
  found = {}
  for task in tasks:
    for method in methods:
      for seed in seeds:
        out = workdir(root, task, method, seed)
        m = test_metrics(out)
        if m is None or not os.path.exists(os.path.join(out, RUN_FILE)):
          continue
        with open(os.path.join(out, RUN_FILE)) as f:
          record = json.load(f)
        tokens = m['generated_tokens'] if 'generated_tokens' in m else m['completion_tokens']
        trained = {stage: (checkpoint_steps(os.path.join(out, stage)) or [0])[-1] for stage in ('bootstrap', 'grpo')}
        final = test_metrics(out, 'latest') or {}
        found[task, method, seed] = {
            'accuracy': m['accuracy'], 'tokens': tokens, 'wall_s': record['wall_s'],
            'num_examples': m['num_examples'], 'steps': trained['bootstrap'], 'grpo_steps': trained['grpo'],
            'final_accuracy': final.get('accuracy'), 'final_tokens': final.get('generated_tokens')}
  return found


def ledger_path(output: str) -> str:
  """The committed record of every finished run's results beside the report (docs/study_mini_runs.json): the
  report is rendered from it, so it outlives the run directories (which stay out of git)."""
  return os.path.splitext(output)[0] + '_runs.json'


def read_ledger(path: str) -> dict:
  """{(task, method, seed): row} of the ledger at `path` ({} when there is none)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = json.load(f)
  return {(r.pop('task'), r.pop('method'), r.pop('seed')): r for r in rows}


def write_ledger(path: str, runs: dict) -> None:
  """`runs` ({(task, method, seed): row}) as a JSON list, one run per line in the order of TASKS and METHODS."""
  order = sorted(runs, key=lambda k: (TASKS.index(k[0]), METHODS.index(k[1]), k[2]))
  lines = [json.dumps({'task': t, 'method': m, 'seed': s, **runs[t, m, s]}) for t, m, s in order]
  with open(path, 'w') as f:
    f.write('[\n' + ',\n'.join(lines) + '\n]\n')


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _final_point(rows) -> tuple[float, float, float, float]:
  """(accuracy %, its std, tokens, their std) of the runs' last checkpoints."""
  acc, acc_std = _mean_std([100 * r['final_accuracy'] for r in rows])
  tok, tok_std = _mean_std([r['final_tokens'] for r in rows])
  return acc, acc_std, tok, tok_std


def plot_task(task: str, runs: dict, methods, path: str) -> None:
  """Accuracy (%) against mean generated tokens, one point per method, error bars: the seeds' std."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(9.5, 4.5))
  for i, method in enumerate(m for m in methods if (task, m) in runs):
    rows = runs[task, method]
    acc, acc_std = _mean_std([100 * r['accuracy'] for r in rows])
    tok, tok_std = _mean_std([r['tokens'] for r in rows])
    ax.errorbar(tok, acc, xerr=tok_std, yerr=acc_std, fmt='o', capsize=3, color=f'C{i}',
                label=f'{LABELS[method]} (n={len(rows)})')
    ax.scatter([r['tokens'] for r in rows], [100 * r['accuracy'] for r in rows], s=8, color=f'C{i}', alpha=0.4)
    final = [r for r in rows if r['final_accuracy'] is not None]
    if final:  # the last checkpoint (final stage): an open marker
      f_acc, f_acc_std, f_tok, f_tok_std = _final_point(final)
      ax.errorbar(f_tok, f_acc, xerr=f_tok_std, yerr=f_acc_std, fmt='o', mfc='none', capsize=3, color=f'C{i}',
                  label=f'{LABELS[method]}, last checkpoint')
  ax.set(xlabel='generated tokens (mean over the test split)', ylabel='test accuracy (%)', title=task)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1))  # beside the axes: no point hidden
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def render(root: str, output: str, tasks, methods, seeds, command_line: str) -> str:
  """The report of the runs recorded in the ledger beside `output` and those finished in `root` (which replace
  their ledger rows and are added to the ledger)."""
  recorded = read_ledger(ledger_path(output))
  recorded.update(collect(root, tasks, methods, seeds))
  os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
  write_ledger(ledger_path(output), recorded)
  runs = {}
  for task in tasks:
    for method in methods:
      rows = [{'seed': s, **recorded[task, method, s]} for s in seeds if (task, method, s) in recorded]
      if rows:
        runs[task, method] = rows
  total = sum(r['wall_s'] for rows in runs.values() for r in rows)
  ledger, count = os.path.basename(ledger_path(output)), sum(len(v) for v in runs.values())
  lines = [f'Command: `{command_line}`', '',
           f'Runs recorded ({ledger}): {count} of {len(tasks) * len(methods) * len(seeds)} '
           f'({len(tasks)} tasks x {len(methods)} methods x seeds {", ".join(map(str, seeds))}); their total wall '
           f'time (training + evaluation, one run at a time): {total / 60:.1f} min.', '']
  for task in tasks:
    lines += [f'### {task}', '',
              '| Method | test acc. (%) mean ± std | n | # tokens | wall (s) | steps | per seed (%) | '
              'last checkpoint: acc. (%) / # tokens |',
              '|---|---|---|---|---|---|---|---|']
    for method in methods:
      rows = runs.get((task, method))
      if not rows:
        lines.append(f'| {LABELS[method]} | not run | 0 | | | | | |')
        continue
      acc, acc_std = _mean_std([100 * r['accuracy'] for r in rows])
      steps = f'{rows[0]["steps"]}' + (f' + {rows[0]["grpo_steps"]} GRPO' if rows[0]['grpo_steps'] else '')
      if starts_from_cot(task, method):
        steps = f'{text_stage_steps(task)} (CoT) + {steps}'
      per_seed = ', '.join(f'{100 * r["accuracy"]:.1f}' for r in rows)
      final = [r for r in rows if r['final_accuracy'] is not None]
      last = ''
      if final:
        f_acc, f_std, f_tok, _ = _final_point(final)
        last = f'{f_acc:.1f} ± {f_std:.1f} / {f_tok:.1f} (n={len(final)})'
      lines.append(f'| {LABELS[method]} | {acc:.1f} ± {acc_std:.1f} | {len(rows)} | '
                   f'{np.mean([r["tokens"] for r in rows]):.1f} | {np.mean([r["wall_s"] for r in rows]):.0f} | '
                   f'{steps} | {per_seed} | {last} |')
    examples = sorted({r['num_examples'] for (t, _), rows in runs.items() if t == task for r in rows})
    if examples:
      plot = f'{os.path.splitext(os.path.basename(output))[0]}_{task}.png'
      plot_task(task, runs, methods, os.path.join(os.path.dirname(output) or '.', plot))
      lines += ['', f'Test examples: {", ".join(map(str, examples))}. ![{task}]({plot})']
    lines.append('')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scale', default='', choices=('', 'long'),
                      help="the suite's schedule: '' (one 50-step epoch per latent stage) or 'long' (1000 steps)")
  parser.add_argument('--root', help='directory of the <task>/<method>/seed<k> workdirs (runs/study_mini[_long])')
  parser.add_argument('--output', help='markdown file to write, its plots beside it (docs/study_mini[_long].md)')
  parser.add_argument('--notes', help='markdown appended to the report when it exists (the setup and the analysis '
                      'of the runs; docs/study_mini[_long]_notes.md)')
  parser.add_argument('--tasks', default=','.join(DEFAULT_TASKS), help=f'comma-separated, of {",".join(TASKS)}')
  parser.add_argument('--methods', default=','.join(METHODS), help='comma-separated')
  parser.add_argument('--seeds', default=','.join(map(str, SEEDS)), help='comma-separated')
  parser.add_argument('--jobs', type=int, default=1, help='runs at a time, each pinned to its own CPU')
  parser.add_argument('--render_only', action='store_true',
                      help='write the report from the ledger and the runs found')
  args, overrides = parser.parse_known_args(argv)
  name = 'study_mini' + (f'_{args.scale}' if args.scale else '')
  args.root = args.root or os.path.join('runs', name)
  args.output = args.output or os.path.join('docs', f'{name}.md')
  args.notes = args.notes or os.path.join('docs', f'{name}_notes.md')
  tasks, methods = args.tasks.split(','), args.methods.split(',')
  seeds = [int(s) for s in args.seeds.split(',')]
  for name, chosen, allowed in (('--tasks', tasks, TASKS), ('--methods', methods, METHODS)):
    if set(chosen) - set(allowed):
      parser.error(f'{name}: {", ".join(sorted(set(chosen) - set(allowed)))} unknown; expected {", ".join(allowed)}.')
  if args.scale and set(tasks) - set(DEFAULT_TASKS):
    parser.error(f'--scale={args.scale}: the suite tasks only ({", ".join(DEFAULT_TASKS)}); got --tasks={args.tasks}.')
  if not args.render_only:  # task by task, in the order of --tasks: a partial study has whole tasks
    order = sorted(methods, key=lambda m: (m != 'cot', m in FROM_COT))  # CoT first: the others start from it
    run_all([(t, m, s) for t in tasks for s in seeds for m in order], args.root, overrides, args.jobs, args.scale)
  line = ' '.join(['python -m dtt_jax.eval.study_mini'] + (argv if argv is not None else sys.argv[1:]))
  text = render(args.root, args.output, tasks, methods, seeds, line)
  if os.path.exists(args.notes):
    with open(args.notes) as f:
      text += '\n' + f.read()
  with open(args.output, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
