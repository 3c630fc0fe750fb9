"""The study runner (dtt_jax/eval/study.py): commands, resumption, the ledger, and the report's tables, budget
curves and paired comparisons, from finished run directories made here."""

import json
import os
import shutil
import sys

import numpy as np

from dtt_jax.eval import heldout, study

IDS = [f'{i:016x}' for i in range(10)]


def _fake_run(root, task, method, seed, correct, tokens, wall, stages=(('bootstrap', 500),), curve=()):
  """A finished run's files: its scored evaluation (`correct`: one flag per IDS), RUN_FILE, and the reports of a
  budget curve [(budget, accuracy, tokens)]."""
  out = study.workdir(str(root), task, method, seed)
  for stage, step in stages:
    os.makedirs(os.path.join(out, stage, 'checkpoints', str(step)), exist_ok=True)
  last = stages[-1][0]
  reports = [(-1, float(np.mean(correct)), tokens, correct)] + [(k, a, t, None) for k, a, t in curve]
  for budget, accuracy, toks, flags in reports:
    path = heldout.output_dir(out, 'test', last, 'best', budget)
    os.makedirs(path)
    metric = {'accuracy': accuracy, 'num_examples': len(IDS), 'step': stages[0][1], 'reasoning_tokens': 1.0,
              ('completion_tokens' if method.startswith('dtt') else 'generated_tokens'): toks}
    with open(os.path.join(path, 'metrics.json'), 'w') as f:
      json.dump(metric, f)
    if flags is not None:
      with open(os.path.join(path, 'completions.jsonl'), 'w') as f:
        f.writelines(json.dumps({'id': i, 'correct': bool(c), 'generated_tokens': 3, 'reasoning_tokens': 1}) + '\n'
                     for i, c in zip(IDS, flags))
  with open(os.path.join(out, study.RUN_FILE), 'w') as f:
    json.dump({'wall_s': wall, 'attempts': 1, 'returncode': 0, 'commit': 'abc1234', 'budget_command': 'x',
               'recipe': study.recipe(task, method)}, f)


def test_report_tables_curves_and_paired_comparisons(tmp_path):
  """Per task: mean ± std over the seeds, tokens, steps (the CoT stage of the runs started from it, GRPO steps),
  wall time; the plot; the budget curves averaged over seeds; DTT against CoT and COCONUT per seed and pooled, with
  the exact McNemar p of the discordant problems."""
  root, out = tmp_path / 'runs', tmp_path / 'docs' / 'study.md'
  cot = [[1] * 10, [1] * 9 + [0], [1] * 8 + [0, 0]]
  for seed, flags in enumerate(cot):
    _fake_run(root, 'addition2', 'cot', seed, flags, 25.0 + seed, 100.0)
  compress = [[1] * 10, [1] * 10, [0] + [1] * 9]
  for seed, flags in enumerate(compress):
    _fake_run(root, 'addition2', 'dtt_compress', seed, flags, 7.0, 60.0, stages=(('bootstrap', 3150), ('grpo', 100)),
              curve=[(0, 0.1, 4.0), (2, 0.5 + 0.1 * seed, 6.0)])
  text = study.render(str(root), str(out), ['addition2'], ['no_cot', 'cot', 'dtt_compress'], [0, 1, 2], 'cmd')
  assert '| CoT | 90.0 ± 10.0 | 3 | 26.0 | 500 | 100 | 100.0, 90.0, 80.0 |' in text
  assert ('| DTT, compressing | 96.7 ± 5.8 | 3 | 7.0 | 800 (CoT) + 3150 + 100 GRPO | 60 | 100.0, 100.0, 90.0 |'
          in text)
  assert '| No-CoT | not run | 0 |' in text
  assert 'Runs recorded (study_runs.json): 6 of 9' in text
  assert '| DTT, compressing | 10.0 (4.0) | 60.0 (6.0) |' in text  # budgets 0 and 2, mean over seeds
  # seed 0: nothing discordant; seed 1: +1; seed 2: +2 -1; pooled +3 / -1: p = 2 * (1 + 4) / 16
  assert ('| DTT, compressing vs CoT | 0: +0 / -0 (p 1); 1: +1 / -0 (p 1); 2: +2 / -1 (p 1) | +3 / -1 | 0.62 |'
          in text)
  assert os.path.getsize(out.parent / 'study_addition2.png') > 0


def test_the_ledger_keeps_the_results_when_the_run_folders_are_gone(tmp_path):
  """The report comes from docs/study_runs.json: rendered again without `runs/`, it is the same; a run found again
  replaces its row; each row names the commit that ran it and which test problems it got right."""
  root, out = tmp_path / 'runs', tmp_path / 'docs' / 'study.md'
  _fake_run(root, 'addition2', 'cot', 0, [1] * 7 + [0] * 3, 25.0, 100.0)
  _fake_run(root, 'addition3', 'cot', 0, [1] * 6 + [0] * 4, 35.0, 200.0)
  first = study.render(str(root), str(out), ['addition2', 'addition3'], ['cot'], [0], 'cmd')
  shutil.rmtree(root)
  assert study.render(str(root), str(out), ['addition2', 'addition3'], ['cot'], [0], 'cmd') == first
  _fake_run(root, 'addition2', 'cot', 0, [1] * 9 + [0], 26.0, 50.0)
  assert '| CoT | 90.0 ± 0.0 | 1 | 26.0 |' in study.render(str(root), str(out), ['addition2'], ['cot'], [0], 'cmd')
  with open(tmp_path / 'docs' / 'study_runs.json') as f:
    rows = json.load(f)
  assert [(r['task'], r['accuracy'], r['wall_s'], r['commit']) for r in rows] == [
      ('addition2', 0.9, 50.0, 'abc1234'), ('addition3', 0.6, 200.0, 'abc1234')]
  assert study.unpack(rows[0]['correct'], 10).tolist() == [True] * 9 + [False]


def test_a_finished_run_is_not_run_again(tmp_path, monkeypatch):
  _fake_run(tmp_path, 'addition2', 'cot', 0, [1] * 10, 25.0, 100.0)
  monkeypatch.setattr(study.subprocess, 'Popen', lambda *a, **k: (_ for _ in ()).throw(AssertionError('ran')))
  assert study.run_one('addition2', 'cot', 0, str(tmp_path))['wall_s'] == 100.0


def test_a_killed_runner_keeps_the_time_so_far_and_the_rerun_adds_to_it(tmp_path, monkeypatch):
  """The runner writes a running run's wall time every tick (returncode None); killed there, the next call reruns
  the run (it resumes from its checkpoints) and adds its time to the ticked time."""
  out = study.workdir(str(tmp_path), 'addition2', 'cot', 0)
  os.makedirs(out)
  with open(os.path.join(out, study.RUN_FILE), 'w') as f:
    json.dump({'wall_s': 100.0, 'attempts': 1, 'returncode': 143}, f)

  def killed(cmd, out, cpu, on_tick):
    on_tick(30.0)
    raise KeyboardInterrupt

  monkeypatch.setattr(study, '_execute', killed)
  try:
    study.run_one('addition2', 'cot', 0, str(tmp_path))
  except KeyboardInterrupt:
    pass
  with open(os.path.join(out, study.RUN_FILE)) as f:
    record = json.load(f)
  assert (record['wall_s'], record['attempts'], record['returncode']) == (130.0, 2, None)
  monkeypatch.setattr(study, '_execute', lambda cmd, out, cpu, on_tick: (0, 10.0))
  record = study.run_one('addition2', 'cot', 0, str(tmp_path))
  assert (record['wall_s'], record['attempts'], record['returncode']) == (140.0, 3, 0)


def test_execute_ticks_while_the_command_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(study, 'TICK_S', 0.05)
  ticks = []
  code, seconds = study._execute([sys.executable, '-c', 'import time; time.sleep(0.5); print("done")'],
                                 str(tmp_path / 'run'), None, ticks.append)
  assert code == 0 and seconds >= 0.5 and len(ticks) >= 3 and ticks == sorted(ticks) and ticks[-1] <= seconds
  assert (tmp_path / 'run.log').read_text() == 'done\n'


def test_a_finished_run_gets_its_budget_curve_once(tmp_path, monkeypatch):
  """COCONUT: after training, `dtt_jax.eval.budget` at 0 .. K + 1 thoughts (addition2: K = 3), once."""
  _fake_run(tmp_path, 'addition2', 'coconut', 0, [1] * 10, 8.0, 100.0)
  out = study.workdir(str(tmp_path), 'addition2', 'coconut', 0)
  with open(os.path.join(out, study.RUN_FILE), 'w') as f:
    json.dump({'wall_s': 100.0, 'attempts': 1, 'returncode': 0}, f)
  ran = []
  monkeypatch.setattr(study, '_execute', lambda cmd, out, cpu: (ran.append(cmd), (0, 5.0))[1])
  record = study.run_one('addition2', 'coconut', 0, str(tmp_path))
  assert ran[0][1:] == ['-m', 'dtt_jax.eval.budget', f'--workdir={out}', '--budgets=0,1,2,3,4']
  assert record['wall_s'] == 100.0 and record['budget_s'] == 5.0
  study.run_one('addition2', 'coconut', 0, str(tmp_path))
  assert len(ran) == 1


def test_latent_methods_start_from_the_cot_runs_text_stage(tmp_path):
  """addition2: the CoT run keeps its checkpoints; COCONUT and the compressing DTT start from its step 800 at epoch
  16 (stage 1 of the schedule); the seed's DTT recipe bootstraps there for the 6000 steps left of 6800; No-CoT
  trains from scratch."""
  root = str(tmp_path)
  cot_dir = study.workdir(root, 'addition2', 'cot', 1)
  assert '--config.bootstrap.keep_checkpoints=1000' in study.command('addition2', 'cot', 1, root)
  start = [f'--config.init_from={cot_dir}', '--config.init_checkpoint=800']
  assert study.command('addition2', 'coconut', 1, root)[-3:] == start + ['--config.coconut.start_epoch=16']
  assert study.command('addition2', 'dtt', 1, root)[-3:] == start + ['--config.bootstrap.steps=6000']
  assert study.command('addition2', 'dtt_compress', 1, root)[-4:] == start + [
      '--config.bootstrap.steps=6000', '--config.coconut.start_epoch=16']
  assert not any('init_from' in a for a in study.command('addition2', 'no_cot', 1, root))
  assert '--config=configs/coconut.py:addition2,dtt,long' in study.command('addition2', 'dtt', 1, root)
  assert study.seeds_of('pause') == (0,) and study.seeds_of('coconut') == (0, 1, 2)


def test_runs_wait_for_their_cot_run_and_skip_when_it_failed(tmp_path, monkeypatch):
  started = []

  def fake_run_one(task, method, seed, root, overrides=(), cpu=None):
    started.append((task, method, seed))
    return {'wall_s': 1.0, 'returncode': 1 if (task, seed) == ('addition3', 0) else 0}

  monkeypatch.setattr(study, 'run_one', fake_run_one)
  runs = [(t, m, 0) for t in ('addition2', 'addition3') for m in ('coconut', 'no_cot', 'cot')]
  done = []
  study.run_all(runs, str(tmp_path), jobs=2, on_done=lambda run, record: done.append(run))
  assert sorted(done) == sorted(started)  # the ledger and report are written after each
  assert started.index(('addition2', 'cot', 0)) < started.index(('addition2', 'coconut', 0))
  assert ('addition3', 'coconut', 0) not in started and len(started) == 5


def test_the_recipe_changes_with_the_schedule_and_overrides_but_not_with_a_new_default_field(monkeypatch):
  from configs import base, coconut  # pylint: disable=g-import-not-at-top
  before = study.recipe('addition2', 'coconut')
  assert study.recipe('addition2', 'coconut', ['--config.bootstrap.lr=1e-3']) != before
  assert study.recipe('addition2', 'cot') != before
  get_config = base.get_config

  def with_new_field():
    c = get_config()
    c.some_new_field = 7
    return c

  monkeypatch.setattr(base, 'get_config', with_new_field)
  assert study.recipe('addition2', 'coconut') == before
  monkeypatch.setattr(coconut, 'FINAL_STAGES', coconut.FINAL_STAGES + 1)
  assert study.recipe('addition2', 'coconut') != before


def test_a_ledger_row_of_todays_recipe_is_not_run_again_unless_a_run_needs_its_checkpoints(tmp_path):
  """A run whose ledger row has today's recipe is skipped; a stale or missing one runs, and a `FROM_COT` run to be
  made brings back its CoT run when that run's directory is gone."""
  cot, no_cot, coconut = ('addition2', 'cot', 0), ('addition2', 'no_cot', 0), ('addition2', 'coconut', 0)
  today = {run: {'recipe': study.recipe(run[0], run[1])} for run in (cot, no_cot, coconut)}
  runs = [cot, no_cot, coconut]
  assert not study.to_run(runs, today, str(tmp_path))
  assert study.to_run(runs, {**today, no_cot: {'recipe': 'earlier'}}, str(tmp_path)) == [no_cot]
  stale_coconut = {**today, coconut: {'recipe': 'earlier'}}
  assert study.to_run(runs, stale_coconut, str(tmp_path)) == [cot, coconut]
  _fake_run(tmp_path, *cot, [1] * 10, 25.0, 100.0)  # its directory is here: COCONUT starts from it
  assert study.to_run(runs, stale_coconut, str(tmp_path)) == [coconut]


def test_rows_of_an_earlier_recipe_stay_out_of_the_report(tmp_path):
  root, out = tmp_path / 'runs', tmp_path / 'docs' / 'study.md'
  _fake_run(root, 'addition2', 'cot', 0, [1] * 10, 25.0, 100.0)
  _fake_run(root, 'addition2', 'no_cot', 0, [1] * 2 + [0] * 8, 3.0, 100.0)
  record_path = os.path.join(study.workdir(str(root), 'addition2', 'no_cot', 0), study.RUN_FILE)
  with open(record_path) as f:
    record = json.load(f)
  with open(record_path, 'w') as f:
    json.dump(dict(record, recipe='earlier'), f)
  text = study.render(str(root), str(out), ['addition2'], ['no_cot', 'cot'], [0], 'cmd')
  assert '| No-CoT | not run | 0 |' in text and '| CoT | 100.0 ± 0.0 | 1 |' in text
  assert 'Rows of an earlier recipe, not shown (the command runs them again): 1.' in text
  assert len(study.read_ledger(str(tmp_path / 'docs' / 'study_runs.json'))) == 2  # kept until run again
