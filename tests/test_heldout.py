"""The eval stage's records (split / path / size), the enumerated addition test bucket, and stable example ids."""

import json

import ml_collections
import pytest

from configs import base
from dtt_jax.data import generators
from dtt_jax.eval import heldout
from dtt_jax.eval.compare import example_id
from tests.conftest import require_shared


def _config(**eval_fields) -> ml_collections.ConfigDict:
  c = base.get_config()
  c.dataset.max_digits = 2
  c.eval.update(eval_fields)
  return c


def test_addition_test_split_is_every_problem_of_the_test_bucket():
  name, records = heldout.eval_records(_config(split='test'), valid=[])
  questions = [r['question'] for r in records]
  expected = [f'{a} + {b} =' for a in range(10, 100) for b in range(10, 100)
              if generators.addition_split(f'{a} + {b} =') == 'test']
  assert name == 'test' and questions == expected and len(expected) == 414
  assert records[0] == generators.addition_record(10, 31)
  train = {r['question'] for r in generators.generate_addition(5000, seed=0, split='train', max_digits=2)}
  assert not train & set(questions)


def test_size_takes_the_first_distinct_records_and_valid_is_the_runs_own():
  valid = [generators.addition_record(a, b) for a, b in ((12, 34), (56, 78), (12, 34), (90, 11))]
  name, records = heldout.eval_records(_config(split='valid'), valid)
  assert name == 'valid' and [r['question'] for r in records] == ['12 + 34 =', '56 + 78 =', '90 + 11 =']
  _, records = heldout.eval_records(_config(split='valid', size=2), valid)
  assert [r['question'] for r in records] == ['12 + 34 =', '56 + 78 =']
  # Generated addition with a size: that many distinct problems of the enumerated test bucket, the same every run.
  _, bucket = heldout.eval_records(_config(split='test'), valid)
  _, sampled = heldout.eval_records(_config(split='test', size=16), valid)
  questions = [r['question'] for r in sampled]
  assert len(set(questions)) == 16 and set(questions) <= {r['question'] for r in bucket}
  assert questions != [r['question'] for r in bucket[:16]]  # a sample of the bucket, not its first problems
  other_seed = _config(split='test', size=16)
  other_seed.seed = 3
  assert [r['question'] for r in heldout.eval_records(other_seed, valid)[1]] == questions


def test_path_is_evaluated_and_names_the_output(tmp_path):
  require_shared('prontoqa')
  path = tmp_path / 'my_probe.json'
  rows = json.load(open(require_shared('prontoqa', 'prontoqa_valid.json')))[:3]
  path.write_text(json.dumps(rows))
  c = _config(path=str(path))
  c.dataset.name = 'prontoqa'
  name, records = heldout.eval_records(c, valid=[])
  assert name == 'my_probe' and len(records) == 3
  assert heldout.output_dir('/w', name, 'grpo') == '/w/eval/my_probe/grpo'
  assert heldout.output_dir('/w', 'test', 'bootstrap', 'latest') == '/w/eval/test@latest/bootstrap'


def test_bad_eval_settings_are_named():
  with pytest.raises(ValueError, match=r"config.eval.split='train': expected one of 'valid', 'test'"):
    heldout.eval_records(_config(split='train'), [])
  with pytest.raises(ValueError, match=r'config.eval.size=-1 must be >= 0'):
    heldout.eval_records(_config(size=-1), [])
  c = _config(split='test')
  c.dataset.max_digits = 4
  with pytest.raises(ValueError, match=r'too many to enumerate: set config.eval.size'):
    heldout.eval_records(c, [])


def test_example_id_is_stable_across_runs_and_rows_are_stamped():
  assert example_id('12 + 34 =') == 'cdc3297e2cc51ff3'  # sha256 of the question, fixed across runs and versions
  rows = heldout.stamp([{'id': example_id('12 + 34 =')}], stage='grpo', step=100, split='test', config='abc')
  assert rows == [{'id': example_id('12 + 34 ='), 'stage': 'grpo', 'step': 100, 'split': 'test', 'config': 'abc'}]
  assert heldout.config_hash(_config()) == heldout.config_hash(_config())
  assert heldout.config_hash(_config()) != heldout.config_hash(_config(size=3))


@pytest.mark.parametrize('name, digits', [('prosqa_mini', 2), ('addition', 4)])
def test_generated_test_split_is_the_same_for_every_seed(name, digits):
  """A study's seeds change the training data and initialisation, not the problems they are scored on: the
  generated test split beyond enumeration is drawn with seed 0 whatever `config.seed` is."""
  runs = []
  for seed in (0, 3):
    c = _config(split='test', size=6)
    c.seed, c.dataset.name, c.dataset.min_digits, c.dataset.max_digits = seed, name, digits, digits
    runs.append(heldout.eval_records(c, valid=[])[1])
  assert runs[0] == runs[1] and len({r['question'] for r in runs[0]}) == 6
