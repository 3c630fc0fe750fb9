"""Dataset readers and the registry `get_dataset(name, split, path=None, ...)` (SPEC §9).

Every dataset becomes a list of records `{question: str, steps: list[str], answer: str}` (extra keys of a file,
e.g. ProsQA's graph fields, are kept). Any file of a supported format is accepted by path: the held-out test files
have exactly the format of the valid files.

    gsm8k     OpenAI jsonl `{question, answer: '... <<48/2=24>>24 ...\\n#### 72'}` (steps: the `<<eq>>` annotations,
              as iCoT and COCONUT use them); iCoT txt `question||<<eq>> <<eq>> #### answer` (a line without
              annotations has natural-language steps, split before a capital after `.!?%` or a digit); COCONUT json
              `[{question, steps, answer}]`; or the hub `openai/gsm8k` ('main') when no local file exists.
    prosqa    COCONUT json. The train split is generated (`generators.generate_prosqa`, valid and test questions
              excluded) unless prosqa/prosqa_train.json exists or a path is given.
    prontoqa  COCONUT json.
    addition  generated (`generators.generate_addition`); the splits are disjoint by construction.
    prosqa_mini  generated (`generators.generate_prosqa_mini`: ProsQA on smaller graphs), disjoint splits like
              addition's; a path is read as a ProsQA (COCONUT json) file.

Default files, under `data_dir` (default: `../shared/data` beside the project), first existing one wins:
see `DEFAULT_FILES`. Empty steps (COCONUT's converter writes `['']` for a solution without equations) are dropped.

Local files are read with HF `datasets` (`load_dataset('json' | 'text', data_files=...)`). A file it cannot read,
or whose records fail validation, is read again in plain Python to name the exact line (jsonl, txt) or record
index (json) and field in the error, which HF's type inference and blank-line skipping would blur.
"""

from __future__ import annotations

import json
import logging
import os
import re

from dtt_jax.data import generators

log = logging.getLogger(__name__)

DATASETS = ('gsm8k', 'prosqa', 'prontoqa', 'addition', 'prosqa_mini')
GENERATED = ('addition', 'prosqa_mini')  # made by `generators`, every split from one symbol set
SPLITS = generators.SPLITS
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA_DIR = os.path.join(os.path.dirname(PROJECT_ROOT), 'shared', 'data')

DEFAULT_FILES: dict[tuple[str, str], tuple[str, ...]] = {
    # GSM8K train without the 500 iCoT-valid questions (those are drawn from GSM8K train); GSM8K-Aug, if present.
    ('gsm8k', 'train'): ('gsm8k/gsm_train.json', 'gsm8k/derived/gsm_train_orig_eqonly.json',
                         'gsm8k/derived/train_orig_eqonly.txt'),
    ('gsm8k', 'valid'): ('gsm8k/coconut_format/gsm_valid.json', 'gsm8k/icot_gsm8k_aug/valid.txt'),
    ('gsm8k', 'test'): ('gsm8k/coconut_format/gsm_test.json', 'gsm8k/icot_gsm8k_aug/test.txt'),
    ('prosqa', 'train'): ('prosqa/prosqa_train.json',),
    ('prosqa', 'valid'): ('prosqa/prosqa_valid.json',),
    ('prosqa', 'test'): ('prosqa/prosqa_test.json',),
    ('prontoqa', 'train'): ('prontoqa/prontoqa_train.json',),
    ('prontoqa', 'valid'): ('prontoqa/prontoqa_valid.json',),
    ('prontoqa', 'test'): ('prontoqa/prontoqa_test.json',),
}
HOW_TO_GET = {
    'gsm8k': ('GSM8K: the OpenAI jsonl from https://github.com/openai/grade-school-math (grade_school_math/data), the '
              'iCoT txt files from https://github.com/da03/Internalize_CoT_Step_by_Step (data/gsm8k), or COCONUT '
              'json made from them by coconut\'s preprocessing/gsm_icot.py; with network access, leave the path '
              'empty and no local file to read the hub dataset openai/gsm8k.'),
    'prosqa': ('ProsQA: prosqa_{valid,test}.json from https://github.com/facebookresearch/coconut (data/); the '
               'train split is generated when prosqa_train.json is absent.'),
    'prontoqa': ('ProntoQA: run coconut\'s preprocessing/prontoqa.py on ProntoQA\'s 5hop_0shot_random.json '
                 '(https://github.com/asaparov/prontoqa) to get prontoqa_{train,valid,test}.json.'),
}
HUB_GSM8K = ('openai/gsm8k', 'main')
HUB_VALID_SIZE = 500  # hub fallback: the last 500 GSM8K train problems are the valid split
DEFAULT_SIZES = {'train': 20000, 'valid': 1000, 'test': 1000}  # generated datasets

_ANNOTATION = re.compile(r'<<[^<>]*>>')
_SENTENCE_END = re.compile(r'(?<=[.!?%0-9])\s+(?=[A-Z])')  # iCoT natural-language steps lack some periods
_GSM8K_ANSWER = '####'


def default_data_dir() -> str | None:
  """`../shared/data` beside the project when it exists, else None."""
  return SHARED_DATA_DIR if os.path.isdir(SHARED_DATA_DIR) else None


# ---------------------------------------------------------------------------------------------------------------
# Record validation and the per-format parsers. `where` names the file and line / record for errors.

def _field(row: dict, key: str, where: str):
  if not isinstance(row, dict):
    raise ValueError(f'{where}: expected a JSON object with fields question, steps, answer; got '
                     f'{type(row).__name__}.')
  if key not in row or row[key] is None:
    raise ValueError(f'{where}: field {key!r} is missing.')
  return row[key]


def _text(row: dict, key: str, where: str) -> str:
  value = _field(row, key, where)
  if not isinstance(value, str):
    raise ValueError(f'{where}: field {key!r} must be a string, got {type(value).__name__} {value!r:.60}.')
  if not value.strip():
    raise ValueError(f'{where}: field {key!r} is empty.')
  return value


def _steps(row: dict, where: str) -> list[str]:
  value = _field(row, 'steps', where)
  if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
    raise ValueError(f"{where}: field 'steps' must be a list of strings, got {value!r:.60}.")
  return [s for s in value if s.strip()]


def _gsm8k_solution(solution: str, where: str) -> tuple[list[str], str]:
  """OpenAI solution text -> (the <<eq>> annotations, the answer after '####')."""
  if _GSM8K_ANSWER not in solution:
    raise ValueError(f"{where}: field 'answer' has no '#### <answer>' line (expected the OpenAI GSM8K solution).")
  body, answer = solution.rsplit(_GSM8K_ANSWER, 1)
  if not answer.strip():
    raise ValueError(f"{where}: field 'answer' is empty after '####'.")
  return _ANNOTATION.findall(body), answer.strip()


def parse_row(row: dict, name: str, where: str) -> dict:
  """A JSON object -> record; COCONUT `{question, steps, answer}`, or for gsm8k the OpenAI `{question, answer}`."""
  question = _text(row, 'question', where)
  if name == 'gsm8k' and isinstance(row, dict) and 'steps' not in row:
    steps, answer = _gsm8k_solution(_text(row, 'answer', where), where)
    return {'question': question, 'steps': steps, 'answer': answer}
  record = dict(row)
  record.update(question=question, steps=_steps(row, where), answer=_text(row, 'answer', where))
  return record


def parse_icot_line(line: str, where: str) -> dict:
  """`question||<<eq>> <<eq>> #### answer` -> record (natural-language steps are split into sentences)."""
  parts = line.split('||')
  if len(parts) != 2:
    raise ValueError(f"{where}: field 'question': expected one '||' between the question and the steps "
                     f"('question||<<eq>> ... #### answer'), found {len(parts) - 1}.")
  question, rest = parts
  if not question.strip():
    raise ValueError(f"{where}: field 'question' is empty.")
  if _GSM8K_ANSWER not in rest:
    raise ValueError(f"{where}: field 'answer': no '#### <answer>' after the steps.")
  cot, answer = rest.rsplit(_GSM8K_ANSWER, 1)
  if not answer.strip():
    raise ValueError(f"{where}: field 'answer' is empty after '####'.")
  steps = _ANNOTATION.findall(cot) if '<<' in cot else [s for s in _SENTENCE_END.split(cot.strip()) if s]
  return {'question': question, 'steps': steps, 'answer': answer.strip()}


# ---------------------------------------------------------------------------------------------------------------
# Files

def _kind(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.json', '.jsonl', '.txt'):
    raise ValueError(f'{path}: unsupported file type {ext!r}; expected .json (COCONUT list of records), '
                     '.jsonl (one JSON object a line) or .txt (iCoT `question||steps #### answer`).')
  return ext[1:]


def _hf_rows(path: str, kind: str) -> list[dict]:
  """All rows of a local file via HF datasets ('text' rows are {'text': line}, blank lines included)."""
  import datasets  # pylint: disable=g-import-not-at-top
  quiet = datasets.utils.are_progress_bars_disabled()
  datasets.utils.disable_progress_bars()  # one 'Generating train split' bar per file is noise in training logs
  try:
    ds = datasets.load_dataset('text' if kind == 'txt' else 'json', data_files=path, split='train')
  finally:
    if not quiet:
      datasets.utils.enable_progress_bars()
  return ds.to_list()


def _python_rows(path: str, kind: str) -> list[tuple[str, object]]:
  """(where, row) pairs read in plain Python; blank lines are skipped, malformed JSON raises naming the line."""
  with open(path, encoding='utf-8') as f:
    if kind == 'json':
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}, line {e.lineno}: invalid JSON ({e.msg}).') from None
      if not isinstance(data, list):
        raise ValueError(f'{path}: expected a JSON list of records (COCONUT format), got {type(data).__name__}.')
      return [(f'{path}, record {i}', row) for i, row in enumerate(data)]
    rows = []
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      if kind == 'txt':
        rows.append((f'{path}, line {n}', line.rstrip('\r\n')))
        continue
      try:
        rows.append((f'{path}, line {n}', json.loads(line)))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}, line {n}: invalid JSON ({e.msg}).') from None
    return rows


def _starts_with_list(path: str) -> bool:
  with open(path, encoding='utf-8') as f:
    head = f.read(4096).lstrip('\ufeff \t\r\n')
  return head.startswith('[')


def read_file(path: str, name: str) -> list[dict]:
  """Records of a local gsm8k / prosqa / prontoqa file (.json, .jsonl, or .txt for gsm8k; prosqa_mini: prosqa)."""
  name = 'prosqa' if name == 'prosqa_mini' else name
  if name not in ('gsm8k', 'prosqa', 'prontoqa'):
    raise ValueError(f'read_file: dataset {name!r} has no file format; expected gsm8k, prosqa or prontoqa.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist. {HOW_TO_GET[name]}')
  kind = _kind(path)
  if kind == 'txt' and name != 'gsm8k':
    raise ValueError(f'{path}: .txt (iCoT) files are GSM8K only; {name} files are COCONUT .json.')

  def parse(where: str, row) -> dict:
    return parse_icot_line(row, where) if kind == 'txt' else parse_row(row, name, where)

  records = None
  if kind != 'json' or _starts_with_list(path):
    try:  # fast path: HF datasets; any problem falls through to the exact plain-Python reading
      rows = _hf_rows(path, kind)
      records = [parse(f'{path}, row {i}', r['text'] if kind == 'txt' else r)
                 for i, r in enumerate(rows) if kind != 'txt' or r['text'].strip()]
    except Exception:  # pylint: disable=broad-except
      records = None
  if records is None:
    records = [parse(where, row) for where, row in _python_rows(path, kind)]
  if not records:
    raise ValueError(f'{path}: no records.')
  return records


# ---------------------------------------------------------------------------------------------------------------
# Registry

def find_default_file(name: str, split: str, data_dir: str | None = None) -> tuple[str | None, list[str]]:
  """(the first existing default file or None, the paths looked at)."""
  data_dir = data_dir or default_data_dir()
  candidates = DEFAULT_FILES.get((name, split), ())
  looked = [os.path.join(data_dir, c) for c in candidates] if data_dir else []
  return next((p for p in looked if os.path.isfile(p)), None), looked


def _hub_gsm8k(split: str) -> list[dict]:
  """GSM8K from the hub (needs network): train minus its last HUB_VALID_SIZE problems, those, or test."""
  import datasets  # pylint: disable=g-import-not-at-top
  try:
    ds = datasets.load_dataset(*HUB_GSM8K, split='test' if split == 'test' else 'train')
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(f'No local GSM8K {split} file and the hub dataset {HUB_GSM8K[0]} could not be loaded '
                            f'({type(e).__name__}: {e}). {HOW_TO_GET["gsm8k"]}') from e
  rows = ds.to_list()
  if split == 'train':
    rows = rows[:-HUB_VALID_SIZE]
  elif split == 'valid':
    rows = rows[-HUB_VALID_SIZE:]
  return [parse_row(r, 'gsm8k', f'{HUB_GSM8K[0]} {split}, record {i}') for i, r in enumerate(rows)]


def get_dataset(name: str, split: str, path: str | None = None, *, data_dir: str | None = None,
                size: int | None = None, seed: int = 0, min_digits: int = 2, max_digits: int = 4,
                prosqa_nodes: int = generators.PROSQA_MINI_NODES,
                prosqa_min_path: int = generators.PROSQA_MINI_MIN_PATH) -> list[dict]:
  """Records {question, steps, answer} of `split` ('train' | 'valid' | 'test') of dataset `name`.

  path: a file in one of the dataset's formats (overrides the default location). data_dir: where default files
  are looked for (default `../shared/data` beside the project). size, seed: generated datasets (addition, prosqa_mini; ProsQA
  train when no file exists); size defaults to `DEFAULT_SIZES[split]`. min_digits, max_digits: addition.
  prosqa_nodes, prosqa_min_path: prosqa_mini's graph size N and shortest answer path (`generate_prosqa_mini`).
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; known: {", ".join(DATASETS)}.')
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {", ".join(SPLITS)}.')
  n = DEFAULT_SIZES[split] if size is None else size
  if name == 'addition':
    if path:
      raise ValueError('The addition dataset is generated; it takes no path (set its size and seed instead).')
    return generators.generate_addition(n, seed, split, min_digits, max_digits)
  if name == 'prosqa_mini' and not path:
    return generators.generate_prosqa_mini(n, seed, split, prosqa_nodes, prosqa_min_path)
  if path:
    return read_file(path, name)
  found, looked = find_default_file(name, split, data_dir)
  if found:
    log.info('%s %s: reading %s', name, split, found)
    return read_file(found, name)
  if name == 'prosqa' and split == 'train':
    exclude = []
    for other in ('valid', 'test'):
      held_out, _ = find_default_file(name, other, data_dir)
      if held_out:
        exclude += [r['question'] for r in read_file(held_out, name)]
    log.info('prosqa train: generating %d records (seed %d), %d held-out questions excluded', n, seed, len(exclude))
    return generators.generate_prosqa(n, seed, exclude=exclude)
  if name == 'gsm8k':
    log.info('gsm8k %s: no local file (looked at %s); loading the hub dataset %s', split, looked, HUB_GSM8K[0])
    return _hub_gsm8k(split)
  where = ', '.join(looked) if looked else f'no data directory ({SHARED_DATA_DIR} does not exist)'
  raise FileNotFoundError(f'No {name} {split} file: looked at {where}. Pass its path '
                          f'(config.dataset.{split}_path) or set config.dataset.data_dir. {HOW_TO_GET[name]}')


def generator_args(c) -> dict:
  """The generators' settings of a `config.dataset` section (defaults where it lacks them)."""
  return dict(min_digits=c.get('min_digits', 2), max_digits=c.get('max_digits', 4),
              prosqa_nodes=c.get('prosqa_nodes', generators.PROSQA_MINI_NODES),
              prosqa_min_path=c.get('prosqa_min_path', generators.PROSQA_MINI_MIN_PATH))


def load_splits(c, seed: int = 0) -> tuple[list[dict], list[dict]]:
  """(train, valid) records from a `config.dataset` section (name, train_path, valid_path, data_dir, train_size,
  valid_size, min_digits, max_digits, prosqa_nodes, prosqa_min_path; empty strings mean the defaults)."""
  common = dict(data_dir=c.get('data_dir') or None, seed=seed, **generator_args(c))
  train = get_dataset(c.name, 'train', c.get('train_path') or None, size=c.get('train_size'), **common)
  valid = get_dataset(c.name, 'valid', c.get('valid_path') or None, size=c.get('valid_size'), **common)
  return train, valid

