"""Generated datasets (SPEC §9): addition carry steps are exact and splits disjoint; generated ProsQA has the
official text format (checked by a parser that also accepts the real valid records), the valid set's graph
statistics, and none of its questions."""

import collections
import json
import pathlib
import re

import pytest

from dtt_jax.data import generators
from tests.conftest import require_shared

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


# ------------------------------------------------------------------------------------------------- addition

def test_addition_steps_follow_the_seed_format():
  assert generators.addition_record(347, 285) == {  # seed 002
      'question': '347 + 285 =',
      'steps': ['7+5=12 write 2 carry 1', '4+8+1=13 write 3 carry 1', '3+2+1=6 write 6'], 'answer': '632'}
  assert generators.addition_record(95, 87)['steps'] == [
      '5+7=12 write 2 carry 1', '9+8+1=18 write 8 carry 1', 'carry 1 write 1']
  assert generators.addition_record(999, 1) == {
      'question': '999 + 1 =', 'answer': '1000',
      'steps': ['9+1=10 write 0 carry 1', '9+0+1=10 write 0 carry 1', '9+0+1=10 write 0 carry 1', 'carry 1 write 1']}
  assert generators.addition_record(10, 20)['steps'] == ['0+0=0 write 0', '1+2=3 write 3']


_STEP = re.compile(r'(\d)\+(\d)(?:\+(1))?=(\d+) write (\d)(?: carry (1))?$|carry 1 write 1$')


def test_generated_addition_steps_compute_the_sum():
  records = generators.generate_addition(2000, seed=0)
  digits = collections.Counter()
  for r in records:
    a, b = map(int, re.fullmatch(r'(\d+) \+ (\d+) =', r['question']).groups())
    assert len(str(a)) == len(str(b)) and 2 <= len(str(a)) <= 4
    digits[len(str(a))] += 1
    assert r['answer'] == str(a + b)
    written, carry = [], 0
    for step in r['steps']:  # replay the steps: column digits, carry in/out and written digit are all consistent
      m = _STEP.match(step)
      assert m, step
      if step == 'carry 1 write 1':
        assert carry == 1
        written.append('1')
        carry = 0
        continue
      x, y, cin, total, digit, cout = m.groups()
      assert int(cin or 0) == carry and int(total) == int(x) + int(y) + carry
      assert int(digit) == int(total) % 10 and int(cout or 0) == int(total) // 10
      written.append(digit)
      carry = int(cout or 0)
    assert ''.join(reversed(written)) == r['answer']
  assert set(digits) == {2, 3, 4} and min(digits.values()) > 550  # n uniform over 2..4


def test_addition_is_deterministic_and_its_splits_are_disjoint():
  assert generators.generate_addition(100, seed=5) == generators.generate_addition(100, seed=5)
  assert generators.generate_addition(100, seed=5) != generators.generate_addition(100, seed=6)
  questions = {s: {r['question'] for r in generators.generate_addition(n, 0, s)}
               for s, n in (('train', 5000), ('valid', 500), ('test', 500))}
  assert not questions['train'] & questions['valid'] and not questions['train'] & questions['test']
  assert not questions['valid'] & questions['test']
  assert all(generators.addition_split(q) == s for s, qs in questions.items() for q in qs)
  small = generators.generate_addition(50, 0, 'valid', min_digits=1, max_digits=1)
  assert all(re.fullmatch(r'\d \+ \d =', r['question']) for r in small)
  with pytest.raises(ValueError, match='min_digits'):
    generators.generate_addition(1, 0, min_digits=3, max_digits=2)


# ------------------------------------------------------------------------------------------------- ProsQA

def check_prosqa_format(record: dict) -> None:
  """Asserts the official ProsQA text format against the record's own graph (passes on the real valid records)."""
  symbol, edges, root = record['idx_to_symbol'], record['edges'], record['root']
  n = len(symbol)
  parents = collections.defaultdict(list)
  children = collections.defaultdict(list)
  for a, b in edges:
    assert 0 <= a < b < n  # nodes are topologically numbered
    parents[b].append(a)
    children[a].append(b)
  assert len(set(symbol)) == n and len({tuple(e) for e in edges}) == len(edges)
  assert all(parents[v] or children[v] for v in range(n))  # no isolated node
  for v in range(n):  # parentless nodes are people, the others concepts
    assert (symbol[v] in generators.PROSQA_ENTITIES) == (not parents[v])
    assert (symbol[v] in generators.PROSQA_CONCEPTS) == bool(parents[v])

  def sentence(a, b):
    return f'{symbol[a]} is a {symbol[b]}.' if not parents[a] else f'Every {symbol[a]} is a {symbol[b]}.'

  head, tail = record['question'].rsplit(' Is ', 1)
  assert sorted(s + '.' for s in head[:-1].split('. ')) == sorted(sentence(a, b) for a, b in edges)
  m = re.fullmatch(r'(\w+) a (\w+) or (\w+)\?', tail)
  assert m and m.group(1) == symbol[root] and not parents[root]
  assert {m.group(2), m.group(3)} == {symbol[record['target']], symbol[record['neg_target']]}
  assert record['answer'] == f'{symbol[root]} is a {symbol[record["target"]]}.'
  dist = {root: 0}
  queue = [root]
  for u in queue:
    for v in children[u]:
      if v not in dist:
        dist[v] = dist[u] + 1
        queue.append(v)
  assert record['target'] in dist and record['neg_target'] not in dist
  assert not children[record['target']] and not children[record['neg_target']]  # both are leaves
  names = {s: i for i, s in enumerate(symbol)}
  path = [root] + [names[re.fullmatch(r'(?:Every )?\w+ is a (\w+)\.', s).group(1)] for s in record['steps']]
  assert record['steps'] == [sentence(a, b) for a, b in zip(path, path[1:])]
  assert all(b in children[a] for a, b in zip(path, path[1:])) and path[-1] == record['target']
  assert len(record['steps']) == dist[record['target']] >= 3  # a shortest path


def test_format_checker_accepts_the_real_records():
  for record in json.loads((FIXTURES / 'prosqa.json').read_text()):
    check_prosqa_format(record)


def test_generated_prosqa_has_the_official_format_and_is_deterministic():
  records = generators.generate_prosqa(300, seed=1)
  for record in records:
    check_prosqa_format(record)
  assert len({r['question'] for r in records}) == 300
  assert records == generators.generate_prosqa(300, seed=1)
  assert records[0] != generators.generate_prosqa(1, seed=2)[0]
  roots = collections.Counter(r['root'] for r in records)
  assert min(roots.values()) > 100  # both entities get asked about
  first_option = sum(re.search(r'Is \w+ a (\w+) or', r['question']).group(1) == r['answer'].split()[-1][:-1]
                     for r in records)
  assert 110 < first_option < 190  # the answer is the first option about half the time


def test_exclude_drops_given_questions():
  first = generators.generate_prosqa(3, seed=4)
  again = generators.generate_prosqa(3, seed=4, exclude=[first[0]['question']])
  assert again[:2] == first[1:] and first[0] not in again


# Paper Table 2 (ProsQA): nodes 22.8, edges 36.0, shortest path 3.8, number of shortest paths 1.6. Tolerances are
# about 4 standard errors of the difference of a 1000-record mean and a 300-record mean.
TOLERANCE = {'nodes': 0.5, 'edges': 1.5, 'shortest_path': 0.2, 'num_shortest_paths': 0.25}
PAPER = {'nodes': 22.8, 'edges': 36.0, 'shortest_path': 3.8, 'num_shortest_paths': 1.6}


@pytest.fixture(scope='module')
def generated():
  return generators.generate_prosqa(1000, seed=0)


def test_generated_statistics_match_the_paper(generated):
  stats = generators.prosqa_statistics(generated)
  for key, value in PAPER.items():
    assert abs(stats[key] - value) <= TOLERANCE[key] + 0.05, (key, stats[key], value)  # paper rounds to 0.1


def test_generated_statistics_match_the_valid_set(generated):
  with open(require_shared('prosqa', 'prosqa_valid.json')) as f:
    valid = json.load(f)
  ours, theirs = generators.prosqa_statistics(generated), generators.prosqa_statistics(valid)
  assert theirs == pytest.approx({'nodes': 22.82, 'edges': 36.26, 'shortest_path': 3.7533, 'num_shortest_paths':
                                  1.6133}, abs=1e-3)
  for key, tol in TOLERANCE.items():
    assert abs(ours[key] - theirs[key]) <= tol, (key, ours[key], theirs[key])
  for record in valid:
    check_prosqa_format(record)
  valid_questions = {r['question'] for r in valid}
  assert not valid_questions & {r['question'] for r in generated}  # generated without `exclude`


# ------------------------------------------------------------------------------------------------- suite datasets

def _shortest_paths(record: dict) -> dict[int, int]:
  children = collections.defaultdict(list)
  for a, b in record['edges']:
    children[a].append(b)
  dist, queue = {record['root']: 0}, [record['root']]
  for u in queue:
    for v in children[u]:
      if v not in dist:
        dist[v] = dist[u] + 1
        queue.append(v)
  return dist


def test_prosqa_mini_splits_are_disjoint_and_deterministic():
  """ProsQA-mini's train, valid and test never share a question (each is the split `question_split` gives it,
  like addition's); a split has distinct questions and is the same for the same seed; get_dataset generates it."""
  from dtt_jax.data import loaders  # pylint: disable=g-import-not-at-top
  splits = {s: generators.generate_prosqa_mini(n, seed=0, split=s) for s, n in (('train', 400), ('valid', 60),
                                                                                 ('test', 60))}
  questions = {s: {r['question'] for r in records} for s, records in splits.items()}
  assert {s: len(q) for s, q in questions.items()} == {'train': 400, 'valid': 60, 'test': 60}
  assert not questions['train'] & questions['valid'] and not questions['train'] & questions['test']
  assert not questions['valid'] & questions['test']
  assert all(generators.question_split(q) == s for s, qs in questions.items() for q in qs)
  assert generators.generate_prosqa_mini(60, seed=0, split='valid') == splits['valid']
  assert generators.generate_prosqa_mini(5, seed=1)[0] != splits['train'][0]
  assert loaders.get_dataset('prosqa_mini', 'test', size=60) == splits['test']
  with pytest.raises(ValueError, match="split='dev'"):
    generators.generate_prosqa_mini(1, split='dev')


def test_prosqa_mini_statistics_are_as_configured():
  """Graphs of at most N = 6 nodes (5.7 on average after isolated nodes are dropped, 4.2 edges), answers at least
  2 steps away (2.06 on average, the steps a shortest path), both options leaves; records with 3 steps or more pass
  the full ProsQA format check. Other sizes are honoured (N = 14, paths >= 3)."""
  records = generators.generate_prosqa_mini(400, seed=0)
  stats = generators.prosqa_statistics(records)
  assert stats == pytest.approx({'nodes': 5.7, 'edges': 4.2, 'shortest_path': 2.06, 'num_shortest_paths': 1.08},
                                abs=0.1)
  steps = collections.Counter(len(r['steps']) for r in records)
  assert min(steps) == generators.PROSQA_MINI_MIN_PATH == 2 and steps[2] > 350 and steps[3] > 10
  for r in records:
    assert len(r['idx_to_symbol']) <= generators.PROSQA_MINI_NODES == 6
    dist = _shortest_paths(r)
    assert len(r['steps']) == dist[r['target']] >= 2 and r['neg_target'] not in dist
    if len(r['steps']) >= 3:
      check_prosqa_format(r)
  larger = generators.generate_prosqa_mini(100, seed=0, num_nodes=14, min_path=3)
  assert max(len(r['idx_to_symbol']) for r in larger) > 8 and min(len(r['steps']) for r in larger) >= 3
  for r in larger:
    check_prosqa_format(r)
  with pytest.raises(ValueError, match='almost never have an answer 9 steps away'):
    generators.generate_prosqa_mini(1, num_nodes=5, min_path=9)


@pytest.mark.parametrize('digits', [2, 3, 4])
def test_addition_at_fixed_digits_has_disjoint_splits(digits):
  """min_digits = max_digits = n (configs/coconut.py:addition<n>): every operand has n digits, n or n + 1 steps,
  and train / valid / test share no problem."""
  splits = {s: generators.generate_addition(m, 0, s, digits, digits) for s, m in (('train', 2000), ('valid', 200),
                                                                                   ('test', 200))}
  for records in splits.values():
    for r in records:
      a, b = r['question'].split(' + ')
      assert len(a) == len(b[:-2]) == digits and len(r['steps']) in (digits, digits + 1)
  questions = {s: {r['question'] for r in records} for s, records in splits.items()}
  assert not questions['train'] & questions['valid'] and not questions['train'] & questions['test']
  assert not questions['valid'] & questions['test']
