"""The study runner's report (dtt_jax/eval/study_mini.py) from finished run directories."""

import json
import os
import shutil

import pytest

from dtt_jax.eval import heldout, study_mini


def _fake_run(root, task, method, seed, accuracy, tokens, wall, stages=(('bootstrap', 500),), final=None):
  """A finished run's files; `final`: (accuracy, tokens) of its last checkpoint's report."""
  out = study_mini.workdir(str(root), task, method, seed)
  if final:
    latest = heldout.output_dir(out, 'test', 'bootstrap', 'latest')
    os.makedirs(latest)
    with open(os.path.join(latest, 'metrics.json'), 'w') as f:
      json.dump({'accuracy': final[0], 'generated_tokens': final[1], 'num_examples': 414}, f)
  for stage, step in stages:
    os.makedirs(os.path.join(out, stage, 'checkpoints', str(step)), exist_ok=True)
  last = stages[-1][0]
  os.makedirs(os.path.join(out, 'eval', 'test', last), exist_ok=True)
  metric = {'accuracy': accuracy, 'num_examples': 414,
            ('completion_tokens' if method == 'dtt' else 'generated_tokens'): tokens}
  with open(os.path.join(out, 'eval', 'test', last, 'metrics.json'), 'w') as f:
    json.dump(metric, f)
  with open(os.path.join(out, study_mini.RUN_FILE), 'w') as f:
    json.dump({'wall_s': wall, 'attempts': 1, 'returncode': 0}, f)


def test_report_gives_mean_std_tokens_wall_time_and_a_plot(tmp_path):
  root, out = tmp_path / 'runs', tmp_path / 'docs' / 'study_mini.md'
  for seed, acc in enumerate((0.70, 0.80, 0.90)):
    _fake_run(root, 'addition2', 'cot', seed, acc, 25.0 + seed, 100.0)
  _fake_run(root, 'addition2', 'dtt', 0, 0.5, 12.0, 60.0, stages=(('bootstrap', 500), ('grpo', 20)))
  for seed, final in enumerate(((0.5, 3.0), (0.7, 3.0))):  # best on validation: a CoT-length checkpoint
    _fake_run(root, 'addition2', 'icot', seed, 0.9, 25.0, 50.0, final=final)
  os.makedirs(out.parent)
  text = study_mini.render(str(root), str(out), ['addition2'], ['no_cot', 'cot', 'icot', 'dtt'], [0, 1, 2], 'cmd')
  assert '| iCoT | 90.0 ± 0.0 | 2 | 25.0 | 50 | 800 (CoT) + 500 | 90.0, 90.0 | 60.0 ± 14.1 / 3.0 (n=2) |' in text
  assert '| CoT | 80.0 ± 10.0 | 3 | 26.0 | 100 | 500 | 70.0, 80.0, 90.0 |' in text
  assert '| DTT (bootstrap + GRPO) | 50.0 ± 0.0 | 1 | 12.0 | 60 | 800 (CoT) + 500 + 20 GRPO | 50.0 |' in text
  assert '| No-CoT | not run | 0 |' in text
  assert 'Runs recorded (study_mini_runs.json): 6 of 12' in text
  assert 'total wall time (training + evaluation, one run at a time): 7.7 min' in text
  assert os.path.getsize(out.parent / 'study_mini_addition2.png') > 0


def test_the_ledger_keeps_the_results_when_the_run_folders_are_gone(tmp_path):
  """The report comes from docs/study_mini_runs.json: rendered again without `runs/`, it is the same; a run found
  again replaces its row; the rows of tasks not rendered stay."""
  root, out = tmp_path / 'runs', tmp_path / 'docs' / 'study_mini.md'
  _fake_run(root, 'addition2', 'cot', 0, 0.7, 25.0, 100.0)
  _fake_run(root, 'addition3', 'cot', 0, 0.6, 35.0, 200.0)
  first = study_mini.render(str(root), str(out), ['addition2', 'addition3'], ['cot'], [0], 'cmd')
  shutil.rmtree(root)
  assert study_mini.render(str(root), str(out), ['addition2', 'addition3'], ['cot'], [0], 'cmd') == first
  _fake_run(root, 'addition2', 'cot', 0, 0.9, 26.0, 50.0)
  assert '| CoT | 90.0 ± 0.0 | 1 | 26.0 | 50 |' in study_mini.render(str(root), str(out), ['addition2'], ['cot'], [0],
                                                                    'cmd')
  with open(tmp_path / 'docs' / 'study_mini_runs.json') as f:
    rows = json.load(f)
  assert [(r['task'], r['accuracy'], r['wall_s']) for r in rows] == [('addition2', 0.9, 50.0),
                                                                      ('addition3', 0.6, 200.0)]


def test_a_finished_run_is_not_run_again(tmp_path, monkeypatch):
  _fake_run(tmp_path, 'addition2', 'cot', 0, 0.7, 25.0, 100.0)
  monkeypatch.setattr(study_mini.subprocess, 'Popen', lambda *a, **k: (_ for _ in ()).throw(AssertionError('ran')))
  assert study_mini.run_one('addition2', 'cot', 0, str(tmp_path))['wall_s'] == 100.0


def test_a_finished_curriculum_run_gets_its_last_checkpoint_scored_once(tmp_path, monkeypatch):
  _fake_run(tmp_path, 'addition2', 'coconut', 0, 0.8, 8.0, 100.0)
  ran = []

  def fake_execute(cmd, out, cpu):
    ran.append(cmd)
    _fake_run(tmp_path, 'addition2', 'coconut', 0, 0.8, 8.0, 100.0, final=(0.7, 8.0))
    return 0, 5.0

  monkeypatch.setattr(study_mini, '_execute', fake_execute)
  assert study_mini.run_one('addition2', 'coconut', 0, str(tmp_path))['wall_s'] == 105.0
  assert len(ran) == 1 and ran[0][-2:] == ['--config.stage=eval', '--config.eval.checkpoint=latest']
  assert ran[0][:-2] == study_mini.command('addition2', 'coconut', 0, str(tmp_path))
  study_mini.run_one('addition2', 'coconut', 0, str(tmp_path))
  assert len(ran) == 1  # scored: not again


def test_latent_methods_start_from_the_cot_runs_text_stage(tmp_path):
  """Addition at 2 digits: the CoT run keeps its checkpoints; COCONUT starts from the CoT run's step 800 at epoch
  16 (its stage 1); DTT's bootstrap from there for the 300 steps left of 1100; No-CoT trains from scratch."""
  root = str(tmp_path)
  cot_dir = study_mini.workdir(root, 'addition2', 'cot', 1)
  assert '--config.bootstrap.keep_checkpoints=1000' in study_mini.command('addition2', 'cot', 1, root)
  coconut = study_mini.command('addition2', 'coconut', 1, root)
  assert coconut[-3:] == [f'--config.init_from={cot_dir}', '--config.init_checkpoint=800',
                          '--config.coconut.start_epoch=16']
  assert study_mini.command('addition2', 'dtt', 1, root)[-3:] == [
      f'--config.init_from={cot_dir}', '--config.init_checkpoint=800', '--config.bootstrap.steps=300']
  assert not any('init_from' in a for a in study_mini.command('addition2', 'no_cot', 1, root))
  long = study_mini.command('addition2', 'dtt', 1, root, scale='long')  # 800 + 3 x 1000 + 150 steps
  assert '--config=configs/coconut.py:addition2,dtt,long' in long and long[-1] == '--config.bootstrap.steps=3150'
  assert not study_mini.starts_from_cot('prontoqa', 'coconut')  # docs/study.md's tasks: no text stage


def test_runs_wait_for_their_cot_run_and_skip_when_it_failed(tmp_path, monkeypatch):
  started = []

  def fake_run_one(task, method, seed, root, overrides=(), cpu=None, scale=''):
    started.append((task, method, seed))
    return {'wall_s': 1.0, 'returncode': 1 if (task, seed) == ('addition3', 0) else 0}

  monkeypatch.setattr(study_mini, 'run_one', fake_run_one)
  runs = [(t, m, 0) for t in ('addition2', 'addition3') for m in ('coconut', 'no_cot', 'cot')]
  study_mini.run_all(runs, str(tmp_path), jobs=2)
  assert started.index(('addition2', 'cot', 0)) < started.index(('addition2', 'coconut', 0))
  assert ('addition3', 'coconut', 0) not in started and len(started) == 5


def test_long_scale_reads_and_writes_its_own_files(tmp_path, monkeypatch, capsys):
  """`--scale=long` defaults to runs/study_mini_long -> docs/study_mini_long.md, its plots named after the report
  (the default scale's study_mini_<task>.png stay apart), with docs/study_mini_long_notes.md appended."""
  monkeypatch.chdir(tmp_path)
  _fake_run(tmp_path / 'runs' / 'study_mini_long', 'addition2', 'cot', 0, 0.9, 25.0, 100.0)
  os.makedirs('docs')
  with open('docs/study_mini_long_notes.md', 'w') as f:
    f.write('## notes of the long runs\n')
  study_mini.main(['--scale=long', '--render_only', '--tasks=addition2', '--methods=cot', '--seeds=0'])
  text = (tmp_path / 'docs' / 'study_mini_long.md').read_text()
  assert '| CoT | 90.0 ± 0.0 | 1 |' in text and text.endswith('## notes of the long runs\n')
  assert sorted(os.listdir('docs')) == ['study_mini_long.md', 'study_mini_long_addition2.png',
                                        'study_mini_long_notes.md', 'study_mini_long_runs.json']
  with pytest.raises(SystemExit):  # the long schedule exists for the suite's tasks only
    study_mini.main(['--scale=long', '--render_only', '--tasks=prontoqa'])
  assert '--scale=long: the suite tasks only (addition2, addition3, addition4, prosqa_mini); got --tasks=prontoqa.' \
      in capsys.readouterr().err
