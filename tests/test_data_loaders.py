"""Dataset readers and the registry (SPEC §9): each format parses to the exact records, the ../shared/data files
load with their documented counts, and malformed input fails naming the file, the line or record, and the field."""

import json
import pathlib
import shutil

import ml_collections
import pytest

from dtt_jax.data import generators, loaders
from tests.conftest import SHARED_DATA, require_shared

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def _read(name: str, dataset: str) -> list[dict]:
  return loaders.read_file(str(FIXTURES / name), dataset)


# ------------------------------------------------------------------------------------------------- formats

def test_gsm8k_openai_jsonl_steps_are_the_annotations_and_answer_follows_hashes():
  records = _read('gsm8k_openai.jsonl', 'gsm8k')
  assert records[0] == {
      'question': 'Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. '
                  'How many clips did Natalia sell altogether in April and May?',
      'steps': ['<<48/2=24>>', '<<48+24=72>>'], 'answer': '72'}
  assert [r['steps'] for r in records[1:]] == [['<<12/60=0.2>>', '<<0.2*50=10>>'],
                                              ['<<100/2=50>>', '<<15*2=30>>', '<<100-50-30-15=5>>']]
  assert [r['answer'] for r in records] == ['72', '10', '5']


def test_gsm8k_icot_txt_equals_the_coconut_json_of_the_same_problems():
  txt, coconut = _read('gsm8k_icot.txt', 'gsm8k'), _read('gsm8k_coconut.json', 'gsm8k')
  assert len(txt) == 3 and txt == coconut
  assert txt[0]['steps'] == ['<<4-2=2>>', '<<2/.5=4>>', '<<12/4=3>>', '<<100*3=300>>']
  assert txt[0]['answer'] == '300' and txt[0]['question'].endswith('How much does he pay per year?')


def test_icot_natural_language_steps_are_split_into_sentences():
  record = loaders.parse_icot_line('Q?||The price rose by 15/100*$40 = $6 The total is $6+$40 = $46. So 46 #### 46',
                                   'x.txt, line 1')
  assert record == {'question': 'Q?', 'steps': ['The price rose by 15/100*$40 = $6', 'The total is $6+$40 = $46.',
                                                'So 46'], 'answer': '46'}


def test_coconut_json_keeps_extra_fields_and_drops_empty_steps(tmp_path):
  prosqa = _read('prosqa.json', 'prosqa')
  assert prosqa[0]['steps'] == ['Tom is a terpus.', 'Every terpus is a brimpus.', 'Every brimpus is a lempus.']
  assert prosqa[0]['answer'] == 'Tom is a lempus.'
  assert (prosqa[0]['root'], prosqa[0]['target'], prosqa[0]['neg_target']) == (1, 16, 13)
  assert prosqa[0]['question'].endswith('Is Tom a lempus or scrompus?')
  prontoqa = _read('prontoqa.json', 'prontoqa')
  assert [r['answer'] for r in prontoqa] == ['True', 'False', 'False']
  assert [len(r['steps']) for r in prontoqa] == [6, 6, 6] and prontoqa[0]['steps'][-1] == 'Alex is happy.'
  path = tmp_path / 'empty_step.json'  # COCONUT's converter writes [''] for a solution without equations
  path.write_text(json.dumps([{'question': 'q', 'steps': [''], 'answer': '4'}]))
  assert loaders.read_file(str(path), 'gsm8k') == [{'question': 'q', 'steps': [], 'answer': '4'}]


# ------------------------------------------------------------------------------------------------- errors

def _expect_error(tmp_path, name: str, text: str, dataset: str, *fragments: str):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(ValueError) as e:
    loaders.read_file(str(path), dataset)
  message = str(e.value)
  for fragment in (str(path),) + fragments:
    assert fragment in message, message


GOOD = {'question': 'Is Tom a wumpus?', 'steps': ['Tom is a wumpus.'], 'answer': 'Tom is a wumpus.'}


def test_missing_field_names_file_physical_line_and_field(tmp_path):
  text = json.dumps(GOOD) + '\n\n' + json.dumps({'steps': [], 'answer': 'x'}) + '\n'  # blank line 2
  _expect_error(tmp_path, 'a.jsonl', text, 'prosqa', 'line 3', "field 'question' is missing")
  _expect_error(tmp_path, 'b.json', json.dumps([GOOD, GOOD, {'question': 'q', 'answer': 'a'}]), 'prontoqa',
                'record 2', "field 'steps' is missing")


def test_wrong_type_names_the_record_even_where_hf_would_coerce(tmp_path):
  # HF datasets turns the string answer '1' of record 0 into an int when record 1 has an int: the error must still
  # name record 1, not record 0.
  rows = [dict(GOOD, answer='1'), dict(GOOD, answer=2)]
  _expect_error(tmp_path, 'a.json', json.dumps(rows), 'prosqa', 'record 1', "field 'answer' must be a string")
  rows = [GOOD, dict(GOOD, steps='Tom is a wumpus.')]
  _expect_error(tmp_path, 'b.json', json.dumps(rows), 'prosqa', 'record 1', "field 'steps' must be a list of strings")
  _expect_error(tmp_path, 'c.jsonl', json.dumps(GOOD) + '\n' + json.dumps(dict(GOOD, question=7)) + '\n', 'prosqa',
                'line 2', "field 'question' must be a string")
  _expect_error(tmp_path, 'd.json', json.dumps([GOOD, 'not an object']), 'prosqa', 'record 1', 'JSON object')


def test_empty_question_and_answer(tmp_path):
  _expect_error(tmp_path, 'a.json', json.dumps([GOOD, dict(GOOD, question='  ')]), 'prosqa', 'record 1',
                "field 'question' is empty")
  _expect_error(tmp_path, 'b.txt', 'q||<<1+1=2>> #### 2\n||<<1+1=2>> #### 2\n', 'gsm8k', 'line 2',
                "field 'question' is empty")
  _expect_error(tmp_path, 'c.txt', 'q||<<1+1=2>> #### \n', 'gsm8k', 'line 1', "field 'answer' is empty")


def test_malformed_lines_and_files(tmp_path):
  _expect_error(tmp_path, 'a.txt', 'q||<<1+1=2>> #### 2\nno separator #### 2\n', 'gsm8k', 'line 2',
                "field 'question'", "'||'")
  _expect_error(tmp_path, 'b.txt', 'q||<<1+1=2>> 2\n', 'gsm8k', 'line 1', "field 'answer'", '####')
  _expect_error(tmp_path, 'c.jsonl', json.dumps(GOOD) + '\n{"question": oops}\n', 'prosqa', 'line 2',
                'invalid JSON')
  _expect_error(tmp_path, 'd.jsonl', json.dumps({'question': 'q', 'answer': 'no hashes'}) + '\n', 'gsm8k', 'line 1',
                "field 'answer'", '####')
  _expect_error(tmp_path, 'e.json', json.dumps(GOOD), 'prosqa', 'expected a JSON list')
  _expect_error(tmp_path, 'f.json', '[]', 'prosqa', 'no records')
  _expect_error(tmp_path, 'g.csv', 'x', 'prosqa', "unsupported file type '.csv'")


def test_missing_file_names_path_and_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'nowhere\.jsonl does not exist.*grade-school-math'):
    loaders.read_file(str(tmp_path / 'nowhere.jsonl'), 'gsm8k')
  with pytest.raises(FileNotFoundError) as e:
    loaders.get_dataset('prosqa', 'test', data_dir=str(tmp_path))
  assert str(tmp_path / 'prosqa' / 'prosqa_test.json') in str(e.value)
  assert 'facebookresearch/coconut' in str(e.value) and 'config.dataset.test_path' in str(e.value)
  with pytest.raises(FileNotFoundError, match='prontoqa.py'):
    loaders.get_dataset('prontoqa', 'valid', data_dir=str(tmp_path))


def test_unknown_names():
  with pytest.raises(ValueError, match="Unknown dataset 'svamp'"):
    loaders.get_dataset('svamp', 'train')
  with pytest.raises(ValueError, match="Unknown split 'dev'"):
    loaders.get_dataset('prosqa', 'dev')
  with pytest.raises(ValueError, match='generated'):
    loaders.get_dataset('addition', 'train', path='x.json')


# ------------------------------------------------------------------------------------------------- registry

@pytest.fixture
def data_dir(tmp_path):
  """A data dir with the fixtures at the default file names."""
  for fixture, target in (('prosqa.json', 'prosqa/prosqa_valid.json'),
                          ('prontoqa.json', 'prontoqa/prontoqa_train.json'),
                          ('gsm8k_coconut.json', 'gsm8k/coconut_format/gsm_valid.json'),
                          ('gsm8k_icot.txt', 'gsm8k/icot_gsm8k_aug/test.txt')):
    (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / fixture, tmp_path / target)
  return tmp_path


def test_registry_reads_default_files_and_explicit_paths(data_dir):
  assert loaders.get_dataset('prosqa', 'valid', data_dir=str(data_dir)) == _read('prosqa.json', 'prosqa')
  assert loaders.get_dataset('prontoqa', 'train', data_dir=str(data_dir)) == _read('prontoqa.json', 'prontoqa')
  assert loaders.get_dataset('gsm8k', 'valid', data_dir=str(data_dir)) == _read('gsm8k_coconut.json', 'gsm8k')
  assert loaders.get_dataset('gsm8k', 'test', data_dir=str(data_dir)) == _read('gsm8k_icot.txt', 'gsm8k')
  explicit = loaders.get_dataset('gsm8k', 'train', str(FIXTURES / 'gsm8k_openai.jsonl'), data_dir=str(data_dir))
  assert [r['answer'] for r in explicit] == ['72', '10', '5']


def test_prosqa_train_is_generated_without_the_held_out_questions(data_dir):
  valid = _read('prosqa.json', 'prosqa')
  train = loaders.get_dataset('prosqa', 'train', data_dir=str(data_dir), size=50, seed=3)
  assert len(train) == 50 and train == generators.generate_prosqa(50, 3, exclude=[r['question'] for r in valid])
  assert not {r['question'] for r in train} & {r['question'] for r in valid}


def test_load_splits_from_the_config_section():
  c = ml_collections.ConfigDict(dict(name='addition', train_path='', valid_path='', data_dir='', train_size=300,
                                     valid_size=40, min_digits=3, max_digits=3))
  train, valid = loaders.load_splits(c, seed=1)
  assert (len(train), len(valid)) == (300, 40)
  assert train == generators.generate_addition(300, 1, 'train', 3, 3)
  assert all(len(r['question'].split(' + ')[0]) == 3 for r in train + valid)


# ------------------------------------------------------------------------------------------------- full files

FULL_COUNTS = [
    ('gsm8k', 'gsm8k/openai_grade_school_math/train.jsonl', 7473),
    ('gsm8k', 'gsm8k/icot_gsm8k_aug/valid.txt', 500),
    ('gsm8k', 'gsm8k/icot_gsm8k_aug/train_no_aug.txt', 6973),
    ('gsm8k', 'gsm8k/coconut_format/gsm_valid.json', 500),
    ('gsm8k', 'gsm8k/derived/train_orig_eqonly.txt', 6973),
    ('gsm8k', 'gsm8k/derived/gsm_train_orig_eqonly.json', 6973),
    ('prosqa', 'prosqa/prosqa_valid.json', 300),
    ('prontoqa', 'prontoqa/prontoqa_train.json', 9000),
    ('prontoqa', 'prontoqa/prontoqa_valid.json', 200),
    ('prontoqa', 'prontoqa/michaelrizvi_coconut/prontoqa_valid.json', 200),
]


@pytest.mark.parametrize('dataset,relpath,count', FULL_COUNTS, ids=[c[1] for c in FULL_COUNTS])
def test_full_files_load_with_their_documented_counts(dataset, relpath, count):
  records = loaders.read_file(str(require_shared(*relpath.split('/'))), dataset)
  assert len(records) == count
  assert all(r['question'].strip() and r['answer'].strip() and isinstance(r['steps'], list) for r in records)


def test_full_txt_and_coconut_json_agree_and_match_the_openai_source():
  for txt, js in (('gsm8k/derived/train_orig_eqonly.txt', 'gsm8k/derived/gsm_train_orig_eqonly.json'),
                  ('gsm8k/icot_gsm8k_aug/valid.txt', 'gsm8k/coconut_format/gsm_valid.json')):
    assert (loaders.read_file(str(require_shared(*txt.split('/'))), 'gsm8k') ==
            loaders.read_file(str(require_shared(*js.split('/'))), 'gsm8k'))
  # derived/ applies the <<eq>>-only rule to the OpenAI solutions: our OpenAI parser must give the same steps
  openai = {r['question']: r for r in loaders.read_file(
      str(require_shared('gsm8k', 'openai_grade_school_math', 'train.jsonl')), 'gsm8k')}
  derived = loaders.read_file(str(require_shared('gsm8k', 'derived', 'gsm_train_orig_eqonly.json')), 'gsm8k')
  assert all(openai[r['question']] == r for r in derived)


def test_full_default_splits():
  require_shared('gsm8k')
  train, valid = loaders.get_dataset('gsm8k', 'train'), loaders.get_dataset('gsm8k', 'valid')
  assert (len(train), len(valid)) == (6973, 500)
  assert not {r['question'] for r in train} & {r['question'] for r in valid}  # the default train has no valid leak
  pronto = loaders.get_dataset('prontoqa', 'train'), loaders.get_dataset('prontoqa', 'valid')
  assert [sum(r['answer'] == 'False' for r in p) for p in pronto] == [4569, 111]  # SOURCES.md
  assert [sum(r['answer'] == 'True' for r in p) for p in pronto] == [4431, 89]
  assert all(len(r['steps']) == 6 for p in pronto for r in p)
  assert len(loaders.get_dataset('prosqa', 'valid')) == 300
  assert loaders.default_data_dir() == str(SHARED_DATA)
