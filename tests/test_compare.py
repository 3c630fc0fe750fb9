"""`dtt_jax.eval.compare`: Wilson and exact McNemar against hand-computed values, gained/lost counts on hand-made
evaluation dirs, refusal of different example sets and duplicate ids, and the CLI once as a subprocess."""

import hashlib
import json
import math
import subprocess
import sys

import pytest

from dtt_jax.eval import compare
from tests.conftest import PROJECT_ROOT


def _write_eval(directory, correct, generated=None, reasoning=None, ids=None, metrics=None):
  """An evaluation dir: completions.jsonl with one row per entry of `correct` (ids q0, q1, ... unless given)."""
  directory.mkdir(parents=True, exist_ok=True)
  ids = ids or [f'q{i}' for i in range(len(correct))]
  generated = generated or [10] * len(correct)
  reasoning = reasoning or [0] * len(correct)
  with open(directory / 'completions.jsonl', 'w') as f:
    for row in zip(ids, correct, generated, reasoning):
      f.write(json.dumps(dict(zip(('id', 'correct', 'generated_tokens', 'reasoning_tokens'), row))) + '\n')
  if metrics is not None:
    (directory / 'metrics.json').write_text(json.dumps(metrics))
  return str(directory)


def test_example_id_is_sha256_prefix_of_utf8_question():
  """16 hex digits of sha256(UTF-8 bytes): stable across runs, differs for different questions."""
  question = 'Natalia sold 48 clips — how many?'
  assert compare.example_id(question) == hashlib.sha256(question.encode('utf-8')).hexdigest()[:16]
  assert len(compare.example_id(question)) == 16
  assert compare.example_id(question) != compare.example_id(question + ' ')


def test_wilson_interval_matches_hand_computation():
  """8/10 at 95%: (0.4902, 0.9433); 0/n starts at 0, n/n ends at 1; the interval contains p."""
  low, high = compare.wilson_interval(8, 10)
  assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
  assert compare.wilson_interval(0, 20)[0] == 0.0 and compare.wilson_interval(20, 20)[1] == pytest.approx(1.0)
  low, high = compare.wilson_interval(0, 20)
  assert high == pytest.approx(1.959963984540054**2 / (20 + 1.959963984540054**2))  # z^2 / (n + z^2) at p = 0
  with pytest.raises(ValueError):
    compare.wilson_interval(11, 10)


def test_mcnemar_exact_p_matches_hand_computation():
  """b=1, c=9: 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024; symmetric in b, c; 1 when b+c=0 or b=c; capped at 1."""
  assert compare.mcnemar_exact_p(1, 9) == 0.021484375
  assert compare.mcnemar_exact_p(9, 1) == 0.021484375
  assert compare.mcnemar_exact_p(0, 0) == 1.0
  assert compare.mcnemar_exact_p(5, 5) == 1.0  # 2 * P(X <= 5) > 1 for Bin(10, 1/2): capped
  assert compare.mcnemar_exact_p(0, 6) == 2 / 64
  n = 95  # large counts stay exact: 2 * sum C(95, i), i <= 9, over 2^95
  assert compare.mcnemar_exact_p(9, 86) == pytest.approx(2 * sum(math.comb(n, i) for i in range(10)) / 2**n,
                                                         rel=1e-12)


def test_gained_and_lost_on_hand_made_dirs(tmp_path):
  """Baseline right on q0-q5, the other run right on q2-q8 (rows in another order): gained 3 (q6, q7, q8), lost 2
  (q0, q1), p = McNemar(2, 3) = 1; accuracies, token means and the metrics.json label as written."""
  a = _write_eval(tmp_path / 'a', [True] * 6 + [False] * 4, generated=list(range(10)), reasoning=[2] * 10,
                  metrics={'method': 'dtt', 'stage': 'bootstrap', 'step': 600})
  order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
  b_correct = {i: 2 <= i <= 8 for i in range(10)}
  b = _write_eval(tmp_path / 'b', [b_correct[i] for i in order], generated=[20] * 10, reasoning=[5] * 10,
                  ids=[f'q{i}' for i in order])
  table = compare.compare([compare.load_run(a), compare.load_run(b)])
  base, other = table
  assert base['label'] == 'dtt bootstrap step 600' and other['label'] == b
  assert (base['correct'], base['n'], base['gained'], base['p_value']) == (6, 10, None, None)
  assert (other['correct'], other['gained'], other['lost']) == (7, 3, 2)
  assert other['p_value'] == compare.mcnemar_exact_p(2, 3) == 1.0
  assert base['generated_tokens'] == 4.5 and other['reasoning_tokens'] == 5.0
  assert (other['ci_low'], other['ci_high']) == compare.wilson_interval(7, 10)
  markdown = compare.to_markdown(table)
  assert 'gained vs dtt bootstrap step 600' in markdown and '| 3 | 2 | 1 |' in markdown


def test_more_runs_are_each_paired_with_the_first(tmp_path):
  """Three dirs: the third is paired with the first (gained 0, lost 2), not the second (it would be gained 2, lost
  0), and the header says each run is against the baseline."""
  a = _write_eval(tmp_path / 'a', [True, True, True, True])
  b = _write_eval(tmp_path / 'b', [False, False, False, False])
  c = _write_eval(tmp_path / 'c', [True, True, False, False])
  table = compare.compare([compare.load_run(d) for d in (a, b, c)])
  assert [(r['gained'], r['lost']) for r in table] == [(None, None), (0, 4), (0, 2)]
  assert 'each run against the baseline' in compare.to_markdown(table)
  table = compare.compare([compare.load_run(d) for d in (b, a, c)])
  assert [(r['gained'], r['lost']) for r in table] == [(None, None), (4, 0), (2, 0)]


def test_different_example_sets_are_refused(tmp_path):
  """The error names both dirs and the number of ids only in each."""
  a = _write_eval(tmp_path / 'a', [True] * 5, ids=['q0', 'q1', 'q2', 'q3', 'q4'])
  b = _write_eval(tmp_path / 'b', [True] * 4, ids=['q0', 'q1', 'q7', 'q8'])
  with pytest.raises(ValueError, match=rf'{a} and {b} hold different example sets: 3 ids only in {a}, 2 ids only '
                                       rf'in {b}'):
    compare.compare([compare.load_run(a), compare.load_run(b)])


def test_duplicate_ids_and_bad_rows_name_file_and_line(tmp_path):
  d = _write_eval(tmp_path / 'a', [True, False, True], ids=['q0', 'q1', 'q0'])
  with pytest.raises(ValueError, match=r"completions\.jsonl:3: duplicate id 'q0' \(first at line 1\)"):
    compare.load_rows(d)
  path = tmp_path / 'b' / 'completions.jsonl'
  path.parent.mkdir()
  path.write_text('{"id": "q0", "correct": true, "generated_tokens": 3, "reasoning_tokens": 0}\n'
                  '{"id": "q1", "correct": 1, "generated_tokens": 3, "reasoning_tokens": 0}\n')
  with pytest.raises(ValueError, match=r"completions\.jsonl:2: field 'correct' = 1 is not a bool"):
    compare.load_rows(str(path.parent))
  path.write_text('{"id": "q0", "correct": true, "generated_tokens": 3}\n')
  with pytest.raises(ValueError, match=r"completions\.jsonl:1: field 'reasoning_tokens' is missing"):
    compare.load_rows(str(path.parent))
  with pytest.raises(FileNotFoundError, match='completions.jsonl is missing'):
    compare.load_rows(str(tmp_path / 'nowhere'))


def test_cli_prints_and_writes_table_and_refuses_mismatch(tmp_path):
  """`python -m dtt_jax.eval.compare A B --out FILE` prints the table and writes the same text; a mismatch exits 1
  with the error on stderr."""
  a = _write_eval(tmp_path / 'a', [True, False, False, False, True])
  b = _write_eval(tmp_path / 'b', [True, True, True, True, False])
  out = tmp_path / 'report' / 'compare.md'
  proc = subprocess.run([sys.executable, '-m', 'dtt_jax.eval.compare', a, b, f'--out={out}'], cwd=PROJECT_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == out.read_text()
  assert f'| {b} | 0.800 [0.376, 0.964] (4/5) | 10.0 | 0.0 | 3 | 1 | 0.625 |' in proc.stdout  # p = 2 * 5/16
  c = _write_eval(tmp_path / 'c', [True], ids=['other'])
  proc = subprocess.run([sys.executable, '-m', 'dtt_jax.eval.compare', a, c], cwd=PROJECT_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and '5 ids only in' in proc.stderr and '1 ids only in' in proc.stderr
