"""The method study (issues #18, #28, #29): every method x task x seed at the budget where the methods learn, then
one report, `docs/study.md`.

    python -m dtt_jax.eval.study --jobs=2          # trains what is missing in runs/study, then docs/study.md
    python -m dtt_jax.eval.study --render_only     # the report from the ledger (docs/study_runs.json) alone

Each run is `python -m dtt_jax.main --config=configs/coconut.py:<task>,<method>,long --config.seed=<seed>
--config.eval.split=test` in `<root>/<task>/<method>/seed<seed>/`. Every method of a task gets the same model,
data, batch, optimizer, dropout, scoring rule and supervised steps (`configs/coconut.py`, `_recipe`); DTT adds its
GRPO steps (in the table). The methods that leave the text chain (`FROM_COT`) start from the same seed's CoT run
at the end of its text stage (`--config.init_from`, the paper's GSM8K recipe), so the steps of that shared stage
count in their budget. Each run is scored on the test split at its final layout's checkpoint best on validation
(`methods.base.FINAL_METRIC`). The methods with a reasoning budget (`BUDGETS`) are then evaluated at forced
budgets too (`dtt_jax.eval.budget`), for the accuracy-vs-tokens curves.

A run that finished (its test evaluation written, or its row in the ledger with today's recipe: `recipe`) is not
run again; an interrupted one resumes from its checkpoints and its wall time adds up over the attempts
(`study_run.json`, written every minute while a run goes, so that a killed runner loses at most that; it also
records the commit and the recipe of the run). `--jobs=N` runs N at a time, each pinned to its own CPU. Every
finished run's results go into a ledger committed beside the report (per seed: accuracy, tokens, wall time, steps,
the budget curve, and which test problems it got right), and the report is rendered from it after every finished
run, rows of an earlier recipe left out: the tables, the plots and the paired comparisons (`dtt_jax.eval.compare`'s
exact McNemar test) outlive the run directories. `docs/study_notes.md` (the setup and the analysis, written by
hand) is appended.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import queue
import subprocess
import sys
import time

import numpy as np

from dtt_jax.eval import budget as budget_lib
from dtt_jax.eval import compare, heldout
from dtt_jax.workdir import checkpoint_steps, config_dict, default_config, differences, write_atomic

TASKS = ('addition2', 'addition3', 'prosqa_mini')
METHODS = ('no_cot', 'cot', 'icot', 'pause', 'pause_as_thought', 'coconut_no_curriculum', 'coconut_no_thought',
           'coconut', 'dtt', 'dtt_compress')
LABELS = {'cot': 'CoT', 'no_cot': 'No-CoT', 'icot': 'iCoT', 'pause': 'Pause token',
          'pause_as_thought': 'Pause as thought', 'coconut_no_curriculum': 'COCONUT w/o curriculum',
          'coconut_no_thought': 'COCONUT w/o thought', 'coconut': 'COCONUT', 'dtt': 'DTT (seed recipe)',
          'dtt_compress': 'DTT, compressing'}
SEEDS = (0, 1, 2)
ONE_SEED = ('pause', 'coconut_no_curriculum')  # far below the others: seed 0 is enough (issue #29)
FROM_COT = ('icot', 'pause_as_thought', 'coconut_no_curriculum', 'coconut_no_thought', 'coconut', 'dtt',
            'dtt_compress')
# (method, baseline): the DTT recipes against CoT and COCONUT; the compressing DTT against iCoT (the same
# curriculum with no latent positions) and COCONUT against COCONUT w/o thought (do the thoughts add anything?)
PAIRED = (('dtt', 'cot'), ('dtt', 'coconut'), ('dtt_compress', 'cot'), ('dtt_compress', 'coconut'),
          ('dtt_compress', 'icot'), ('coconut', 'coconut_no_thought'))
RUN_FILE = 'study_run.json'  # {wall_s, attempts, command, returncode, commit}
TICK_S = 60  # how often a running run's wall time so far is written to its RUN_FILE
SCALE = 'long'  # configs/coconut.py's schedule: 1000 steps per latent stage


def seeds_of(method: str, seeds=SEEDS) -> tuple[int, ...]:
  return tuple(s for s in seeds if s == 0 or method not in ONE_SEED)


def workdir(root: str, task: str, method: str, seed: int) -> str:
  return os.path.join(root, task, method, f'seed{seed}')


def task_config(task: str, method: str):
  from configs import coconut as coconut_configs  # pylint: disable=g-import-not-at-top
  return coconut_configs.get_config(f'{task},{method},{SCALE}')


def recipe(task: str, method: str, overrides=()) -> str:
  """sha256[:12] of what the run's config sets apart from `configs/base.py`'s defaults, and the study's command-line
  overrides: a ledger row with another recipe is stale (not in the report; the study command runs it again). A new
  config field at its default leaves every recipe as it was; a changed default of `configs/base.py` does not show
  (each row names its commit too)."""
  changed = differences(default_config(), config_dict(task_config(task, method)))
  text = json.dumps([[key, value] for key, _, value in changed] + [list(overrides)], sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def text_stage_steps(task: str) -> int:
  """Steps of the task's text stage (stage 0, CoT), which the `FROM_COT` methods take from the CoT run."""
  k = task_config(task, 'cot').coconut
  return k.first_stage_epochs * k.steps_per_epoch


def budgets(task: str, method: str) -> tuple[int, ...]:
  """The forced budgets of a method's curve (() without one): 0 to K + 1 thoughts / pauses / latent positions
  (K = max_stage x c, the final stage's count); DTT's seed recipe, whose span holds one position per CoT token,
  up to the longest CoT."""
  c = task_config(task, method)
  if method not in ('coconut', 'pause_as_thought', 'pause', 'dtt', 'dtt_compress'):
    return ()
  top = c.coconut.max_stage * c.coconut.c_thoughts
  if method == 'dtt':
    return tuple(sorted({0, 1, 2, 4, top, 2 * top, *range(8, c.data.max_completion_len, 8)}))
  return tuple(range(top + 2 if method != 'pause' else top + 1))


def command(task: str, method: str, seed: int, root: str, overrides=()) -> list[str]:
  """The run's command line: the CoT run keeps every checkpoint (the others start from the one ending its text
  stage); a `FROM_COT` method starts there and trains the rest of the schedule."""
  extra = []
  if method == 'cot':
    extra = ['--config.bootstrap.keep_checkpoints=1000']
  elif method in FROM_COT:
    c = task_config(task, method)
    text = text_stage_steps(task)
    extra = [f'--config.init_from={workdir(root, task, "cot", seed)}', f'--config.init_checkpoint={text}']
    if c.method == 'dtt':
      extra.append(f'--config.bootstrap.steps={c.bootstrap.steps - text}')
    if method != 'dtt':  # the stage schedule goes on from the text stage
      extra.append(f'--config.coconut.start_epoch={c.coconut.first_stage_epochs}')
  return [sys.executable, '-m', 'dtt_jax.main', f'--config=configs/coconut.py:{task},{method},{SCALE}',
          f'--workdir={workdir(root, task, method, seed)}', f'--config.seed={seed}', '--config.eval.split=test',
          *extra, *overrides]


def scored_dir(out: str) -> str | None:
  """The report folder of a finished run's scored evaluation (DTT: its last stage), None before it."""
  for stage in ('grpo', 'bootstrap'):
    path = heldout.output_dir(out, 'test', stage)
    if os.path.exists(os.path.join(path, 'metrics.json')):
      return path
  return None


def _commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def _execute(cmd: list[str], out: str, cpu: int | None, on_tick=lambda seconds: None) -> tuple[int, float]:
  """(exit code, seconds) of `cmd`, pinned to `cpu` when given, its output appended to `<out>.log`; `on_tick(seconds
  so far)` every `TICK_S` while it runs."""
  start = time.time()
  with open(out + '.log', 'a') as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    if cpu is not None:
      os.sched_setaffinity(proc.pid, {cpu})  # before it starts its thread pools
    while True:
      try:
        return proc.wait(timeout=TICK_S), time.time() - start
      except subprocess.TimeoutExpired:
        on_tick(time.time() - start)


def run_one(task: str, method: str, seed: int, root: str, overrides=(), cpu: int | None = None) -> dict:
  """Trains and evaluates one run (unless finished), pinned to `cpu` when given, then evaluates its budget curve;
  its log next to the workdir, its wall time and commit in RUN_FILE."""
  out = workdir(root, task, method, seed)
  record_path = os.path.join(out, RUN_FILE)
  record = {'wall_s': 0.0, 'attempts': 0}
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
  if scored_dir(out) is None or record.get('returncode') != 0:
    os.makedirs(out, exist_ok=True)
    cmd = command(task, method, seed, root, overrides)
    before = record['wall_s']
    record = {'wall_s': before, 'attempts': record['attempts'] + 1, 'command': ' '.join(cmd[1:]),
              'returncode': None, 'commit': _commit(), 'recipe': recipe(task, method, overrides)}
    # returncode None: running, or its runner was killed

    def tick(seconds):  # the time so far survives a killed runner
      write_atomic(record_path, json.dumps(dict(record, wall_s=before + seconds), indent=2))

    returncode, seconds = _execute(cmd, out, cpu, tick)
    record.update(wall_s=before + seconds, returncode=returncode)
  curve = budgets(task, method)
  if record['returncode'] == 0 and curve and 'budget_command' not in record:
    cmd = [sys.executable, '-m', 'dtt_jax.eval.budget', f'--workdir={out}', f'--budgets={",".join(map(str, curve))}']
    returncode, seconds = _execute(cmd, out, cpu)
    record.update(budget_command=' '.join(cmd[1:]), budget_s=seconds, returncode=returncode)
  write_atomic(record_path, json.dumps(record, indent=2))
  return record


def run_all(runs, root: str, overrides=(), jobs: int = 1, on_done=lambda run, record: None) -> None:
  """Every (task, method, seed) of `runs`, `jobs` at a time (each on its own CPU when there are that many), a
  `FROM_COT` run once its CoT run has finished (skipped when that one failed); `on_done(run, record)` after each."""
  cpus = sorted(os.sched_getaffinity(0))
  slots = queue.Queue()
  for i in range(jobs):
    slots.put(cpus[i] if len(cpus) >= jobs > 1 else None)

  def job(task, method, seed):
    cpu = slots.get()
    try:
      return run_one(task, method, seed, root, overrides, cpu)
    finally:
      slots.put(cpu)

  needs = {(t, m, s): (t, 'cot', s) if m in FROM_COT else None for t, m, s in runs}
  pending, running, ok, failed = list(runs), {}, set(), set()
  for cot in set(needs.values()) - set(runs) - {None}:  # CoT runs of an earlier call
    (ok if scored_dir(workdir(root, *cot)) is not None else failed).add(cot)
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
        on_done(run, record)


def to_run(runs, ledger: dict, root: str, overrides=()) -> list:
  """The runs of `runs` (in their order) that the ledger holds no row of with today's recipe, and the CoT runs
  those start from when their directories are gone: a run in the ledger is not run again unless another run needs
  its checkpoints (run directories are local; the ledger is committed)."""
  todo = {r for r in runs if ledger.get(r, {}).get('recipe') != recipe(r[0], r[1], overrides)}
  todo |= {(t, 'cot', s) for t, m, s in todo if m in FROM_COT and scored_dir(workdir(root, t, 'cot', s)) is None}
  return [r for r in runs if r in todo]


# ------------------------------------------------------------------------------------------------------ ledger


def correct_bits(rows: dict[str, dict]) -> tuple[str, str]:
  """(hex of the correct flags in the order of the sorted example ids, sha256[:12] of those ids): which test
  problems a run got right, compactly, and the key that tells which runs hold the same problems."""
  ids = sorted(rows)
  bits = np.packbits(np.array([bool(rows[i]['correct']) for i in ids], np.uint8))
  return bits.tobytes().hex(), hashlib.sha256(','.join(ids).encode()).hexdigest()[:12]


def unpack(bits: str, n: int) -> np.ndarray:
  """[n] bool of `correct_bits`'s hex."""
  return np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8))[:n].astype(bool)


def collect(root: str, tasks, methods, seeds) -> dict:
  """{(task, method, seed): ledger row} of the finished runs in `root`."""
  found = {}
  for task in tasks:
    for method in methods:
      for seed in seeds_of(method, seeds):
        out = workdir(root, task, method, seed)
        scored = scored_dir(out)
        if scored is None or not os.path.exists(os.path.join(out, RUN_FILE)):
          continue
        with open(os.path.join(out, RUN_FILE)) as f:
          record = json.load(f)
        with open(os.path.join(scored, 'metrics.json')) as f:
          m = json.load(f)
        bits, ids = correct_bits(compare.load_rows(scored))
        curve = []
        for k in budgets(task, method):
          path = budget_lib.metrics_path(out, 'test', os.path.basename(scored), 'best', k)
          if os.path.exists(path):
            with open(path) as f:
              b = json.load(f)
            curve.append([k, b['accuracy'], b.get('generated_tokens', b.get('completion_tokens'))])
        trained = {stage: (checkpoint_steps(os.path.join(out, stage)) or [0])[-1] for stage in ('bootstrap', 'grpo')}
        found[task, method, seed] = {
            'accuracy': m['accuracy'], 'tokens': m.get('generated_tokens', m.get('completion_tokens')),
            'num_examples': m['num_examples'], 'scored_step': m['step'], 'wall_s': record['wall_s'],
            'steps': trained['bootstrap'], 'grpo_steps': trained['grpo'], 'budget_curve': curve,
            'correct': bits, 'ids': ids, 'commit': record.get('commit', 'unknown'), 'recipe': record.get('recipe')}
  return found


def ledger_path(output: str) -> str:
  """The committed record of every finished run's results beside the report (docs/study_runs.json)."""
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


# ------------------------------------------------------------------------------------------------------ report


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def mean_curve(rows) -> list[tuple[int, float, float]]:
  """(budget, mean accuracy %, mean tokens) over the seeds that have each budget."""
  by_budget = {}
  for r in rows:
    for k, acc, tok in r['budget_curve']:
      by_budget.setdefault(k, []).append((100 * acc, tok))
  return [(k, float(np.mean([a for a, _ in v])), float(np.mean([t for _, t in v])))
          for k, v in sorted(by_budget.items())]


def plot_task(task: str, runs: dict, methods, path: str) -> None:
  """Accuracy (%) against mean generated tokens: one point per method (error bars: the seeds' std), each method's
  budget curve (mean over seeds) as a line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(10, 5))
  for i, method in enumerate(m for m in methods if (task, m) in runs):
    rows = runs[task, method]
    acc, acc_std = _mean_std([100 * r['accuracy'] for r in rows])
    tok, tok_std = _mean_std([r['tokens'] for r in rows])
    ax.errorbar(tok, acc, xerr=tok_std, yerr=acc_std, fmt='o', ms=7, capsize=3, color=f'C{i}',
                label=f'{LABELS[method]} (n={len(rows)})')
    curve = mean_curve(rows)
    if curve:
      ax.plot([t for _, _, t in curve], [a for _, a, _ in curve], '.-', lw=1, ms=4, alpha=0.7, color=f'C{i}')
  ax.set(xlabel='generated tokens (mean over the test split)', ylabel='test accuracy (%)', title=task,
         ylim=(-2, 102))
  ax.set_xscale('symlog', linthresh=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1))  # beside the axes: no point hidden
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def paired_rows(task: str, recorded: dict, seeds) -> list[str]:
  """Markdown rows: each `PAIRED` (method, baseline) per seed and pooled over the seeds both have: problems gained
  (wrong in the baseline, right in the method) and lost, and the exact McNemar p (`compare.mcnemar_exact_p`)."""
  lines = []
  for method, base in PAIRED:
    pairs = [(s, recorded[task, method, s], recorded[task, base, s]) for s in seeds
             if (task, method, s) in recorded and (task, base, s) in recorded]
    pairs = [(s, a, b) for s, a, b in pairs if a['ids'] == b['ids']]
    gained_total = lost_total = 0
    cells = []
    for seed, a, b in pairs:
      right, base_right = unpack(a['correct'], a['num_examples']), unpack(b['correct'], b['num_examples'])
      gained, lost = int(np.sum(right & ~base_right)), int(np.sum(base_right & ~right))
      gained_total, lost_total = gained_total + gained, lost_total + lost
      cells.append(f'{seed}: +{gained} / -{lost} (p {compare.mcnemar_exact_p(lost, gained):.2g})')
    if pairs:
      pooled = compare.mcnemar_exact_p(lost_total, gained_total)
      lines.append(f'| {LABELS[method]} vs {LABELS[base]} | {"; ".join(cells)} | +{gained_total} / -{lost_total} | '
                   f'{pooled:.2g} |')
  return lines


def render(root: str, output: str, tasks, methods, seeds, command_line: str, overrides=()) -> str:
  """The report of the runs recorded in the ledger beside `output` and those finished in `root` (which replace
  their ledger rows and are added to the ledger); rows of another recipe than today's stay out of it."""
  ledger = read_ledger(ledger_path(output))
  ledger.update(collect(root, tasks, methods, seeds))
  os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
  write_ledger(ledger_path(output), ledger)
  recorded = {k: r for k, r in ledger.items()
              if k[0] in tasks and k[1] in methods and r.get('recipe') == recipe(k[0], k[1], overrides)}
  runs = {}
  for task in tasks:
    for method in methods:
      rows = [{'seed': s, **recorded[task, method, s]} for s in seeds_of(method, seeds)
              if (task, method, s) in recorded]
      if rows:
        runs[task, method] = rows
  planned = sum(len(seeds_of(m, seeds)) for m in methods) * len(tasks)
  total = sum(r['wall_s'] for rows in runs.values() for r in rows)
  stale = sum(k[0] in tasks and k[1] in methods and k not in recorded for k in ledger)
  count = sum(len(v) for v in runs.values())
  lines = [f'Command: `{command_line}`', '',
           f'Runs recorded ({os.path.basename(ledger_path(output))}): {count} of {planned}; their total wall time '
           f'(training + evaluation, one core per run): {total / 3600:.1f} h.' + (
               f' Rows of an earlier recipe, not shown (the command runs them again): {stale}.' if stale else ''), '']
  for task in tasks:
    lines += [f'### {task}', '',
              '| Method | test acc. (%) mean ± std | n | # tokens | steps | wall (s) / run | per seed (%) |',
              '|---|---|---|---|---|---|---|']
    for method in methods:
      rows = runs.get((task, method))
      if not rows:
        lines.append(f'| {LABELS[method]} | not run | 0 | | | | |')
        continue
      acc, acc_std = _mean_std([100 * r['accuracy'] for r in rows])
      steps = f'{rows[0]["steps"]}' + (f' + {rows[0]["grpo_steps"]} GRPO' if rows[0]['grpo_steps'] else '')
      if method in FROM_COT:
        steps = f'{text_stage_steps(task)} (CoT) + {steps}'
      per_seed = ', '.join(f'{100 * r["accuracy"]:.1f}' for r in rows)
      lines.append(f'| {LABELS[method]} | {acc:.1f} ± {acc_std:.1f} | {len(rows)} | '
                   f'{np.mean([r["tokens"] for r in rows]):.1f} | {steps} | '
                   f'{np.mean([r["wall_s"] for r in rows]):.0f} | {per_seed} |')
    examples = sorted({r['num_examples'] for (t, _), rows in runs.items() if t == task for r in rows})
    if examples:
      plot = f'{os.path.splitext(os.path.basename(output))[0]}_{task}.png'
      plot_task(task, runs, methods, os.path.join(os.path.dirname(output) or '.', plot))
      lines += ['', f'Test examples: {", ".join(map(str, examples))}. ![{task}]({plot})']
    curves = [(m, mean_curve(runs[task, m])) for m in methods if (task, m) in runs and mean_curve(runs[task, m])]
    if curves:
      lines += ['', 'Accuracy (%) at forced budgets (mean over the seeds; generated tokens in parentheses):', '',
                '| Method | ' + ' | '.join(f'budget {k}' for k in sorted({k for _, c in curves for k, _, _ in c}))
                + ' |']
      budget_keys = sorted({k for _, c in curves for k, _, _ in c})
      lines.append('|---|' + '---|' * len(budget_keys))
      for method, curve in curves:
        at = {k: f'{a:.1f} ({t:.1f})' for k, a, t in curve}
        lines.append(f'| {LABELS[method]} | ' + ' | '.join(at.get(k, '') for k in budget_keys) + ' |')
    paired = paired_rows(task, recorded, seeds)
    if paired:
      lines += ['', 'Paired on the same test problems (gained / lost against the baseline, exact McNemar p):', '',
                '| Comparison | per seed | pooled | pooled p |', '|---|---|---|---|', *paired]
    lines.append('')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', default=os.path.join('runs', 'study'),
                      help='directory of the <task>/<method>/seed<k> workdirs')
  parser.add_argument('--output', default=os.path.join('docs', 'study.md'),
                      help='markdown file to write, its plots and ledger beside it')
  parser.add_argument('--notes', default=os.path.join('docs', 'study_notes.md'),
                      help='markdown appended to the report when it exists (setup and analysis)')
  parser.add_argument('--tasks', default=','.join(TASKS), help=f'comma-separated, of {",".join(TASKS)}')
  parser.add_argument('--methods', default=','.join(METHODS), help='comma-separated')
  parser.add_argument('--seeds', default=','.join(map(str, SEEDS)),
                      help=f'comma-separated ({", ".join(ONE_SEED)}: seed 0 only)')
  parser.add_argument('--jobs', type=int, default=1, help='runs at a time, each pinned to its own CPU')
  parser.add_argument('--render_only', action='store_true', help='write the report from the ledger and the runs found')
  args, overrides = parser.parse_known_args(argv)
  tasks, methods = args.tasks.split(','), args.methods.split(',')
  seeds = [int(s) for s in args.seeds.split(',')]
  for name, chosen, allowed in (('--tasks', tasks, TASKS), ('--methods', methods, METHODS)):
    if set(chosen) - set(allowed):
      parser.error(f'{name}: {", ".join(sorted(set(chosen) - set(allowed)))} unknown; expected {", ".join(allowed)}.')
  line = ' '.join(['python -m dtt_jax.eval.study'] + (argv if argv is not None else sys.argv[1:]))

  def publish() -> str:  # the ledger, the report and its plots, as far as the runs have gone
    text = render(args.root, args.output, tasks, methods, seeds, line, overrides)
    if os.path.exists(args.notes):
      with open(args.notes) as f:
        text += '\n' + f.read()
    with open(args.output, 'w') as f:
      f.write(text)
    return text

  if not args.render_only:  # task by task, in the order of --tasks: a partial study has whole tasks
    order = sorted(methods, key=lambda m: (m != 'cot', m in FROM_COT))  # CoT first: the others start from it
    runs = [(t, m, s) for t in tasks for s in seeds for m in order if s in seeds_of(m, seeds)]
    runs = to_run(runs, read_ledger(ledger_path(args.output)), args.root, overrides)
    run_all(runs, args.root, overrides, args.jobs, on_done=lambda run, record: publish())
  print(publish())


if __name__ == '__main__':
  main()
