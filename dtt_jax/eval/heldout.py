"""What the eval stage reads and where it writes (`config.eval`).

* Records: `eval.path` (a file in the dataset's formats; reports named after the file), else `eval.split`: 'valid'
  (the validation records the run trained beside) or 'test' (the dataset's test file; for generated addition, every
  problem of the test bucket at the configured digit counts, enumerated in order, or with `eval.size` a fixed random
  sample of them; beyond 3 digits `eval.size` problems generated from the bucket; a generated test split is the same
  for every `config.seed`, which changes the training data and initialisation only). Repeated questions are dropped
  (the first is kept), then the first `eval.size` records are taken (0: all).
* Reports: `<workdir>/eval/<split or file name>/<stage>/` (`report.write_report`); an `eval.checkpoint` other than
  'best' in `<split or file name>@<checkpoint>/`, a forced budget (`eval.budget`) in `...@budget<k>/`. Every row carries the example's `id` (a hash of its question,
  `compare.example_id`), the `stage`, the checkpoint `step`, the `split` and a hash of the config, so rows of two
  runs join by id (`python -m dtt_jax.eval.compare`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random

from dtt_jax import data as data_lib
from dtt_jax.data import generators

log = logging.getLogger(__name__)

SPLITS = ('valid', 'test')
MAX_SCANNED = 1_000_000  # addition problems scanned to enumerate a bucket (up to 3 digits)


def eval_records(config, valid: list[dict]) -> tuple[str, list[dict]]:
  """(name of the evaluated set, its records) for `config.eval` (see the module docstring)."""
  e, d = config.eval, config.dataset
  if e.split not in SPLITS:
    raise ValueError(f'config.eval.split={e.split!r}: expected one of {", ".join(map(repr, SPLITS))}.')
  if e.size < 0:
    raise ValueError(f'config.eval.size={e.size} must be >= 0 (0: all).')
  if e.path:
    if d.name == 'addition':
      raise ValueError('config.eval.path: the addition dataset is generated and reads no file; use '
                       'config.eval.split instead.')
    name, records = os.path.splitext(os.path.basename(e.path))[0], data_lib.read_file(e.path, d.name)
  elif e.split == 'valid':
    name, records = 'valid', valid
  elif d.name == 'addition' and (not e.size or _addition_problems(d.min_digits, d.max_digits) <= MAX_SCANNED):
    name, records = 'test', enumerate_addition('test', d.min_digits, d.max_digits)
    if e.size:  # the same sample of the bucket for every run and seed
      records = random.Random(0).sample(records, min(e.size, len(records)))
  else:
    name = 'test'
    records = data_lib.get_dataset(d.name, 'test', d.get('test_path') or None, data_dir=d.get('data_dir') or None,
                                   size=e.size or None, seed=0,
                                   **data_lib.generator_args(d))  # generated: the same test problems for every seed
  seen = set()
  distinct = [r for r in records if not (r['question'] in seen or seen.add(r['question']))]  # first of each
  if len(distinct) < len(records):
    log.info('eval %s: %d repeated questions dropped.', name, len(records) - len(distinct))
  return name, distinct[:e.size] if e.size else distinct


def _addition_problems(min_digits: int, max_digits: int) -> int:
  """Problems (all splits) whose operands both have n digits, n in [min_digits, max_digits]."""
  return sum((10 ** n - (10 ** (n - 1) if n > 1 else 0)) ** 2 for n in range(min_digits, max_digits + 1))


def enumerate_addition(split: str, min_digits: int, max_digits: int) -> list[dict]:
  """Every addition problem of `split` whose operands both have n digits, n in [min_digits, max_digits]."""
  total = _addition_problems(min_digits, max_digits)
  if total > MAX_SCANNED:
    raise ValueError(f'The addition {split} bucket at {min_digits}-{max_digits} digits holds about '
                     f'{total // 20:,} problems, too many to enumerate: set config.eval.size to sample that many.')
  records = []
  for n in range(min_digits, max_digits + 1):
    lo, hi = (10 ** (n - 1) if n > 1 else 0), 10 ** n
    for a in range(lo, hi):
      for b in range(lo, hi):
        if generators.addition_split(f'{a} + {b} =') == split:
          records.append(generators.addition_record(a, b))
  return records


def config_hash(config) -> str:
  """First 12 hex digits of sha256 of the config's JSON: tells the runs rows came from apart."""
  return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:12]


def output_dir(workdir: str, name: str, stage: str, checkpoint='best', budget: int = -1) -> str:
  """`<workdir>/eval/<name>/<stage>`; another `eval.checkpoint` than 'best' reports in `<name>@<checkpoint>`
  (`test@latest`, `test@800`), a forced reasoning budget `eval.budget` >= 0 in `<name>@budget<k>` (`test@budget2`,
  `test@latest@budget2`), beside the best's report."""
  folder = name if str(checkpoint) == 'best' else f'{name}@{checkpoint}'
  return os.path.join(workdir, 'eval', folder if budget < 0 else f'{folder}@budget{budget}', stage)


def stamp(rows: list[dict], **fields) -> list[dict]:
  """Adds `fields` (stage, step, split, config) to every row, in place; returns the rows."""
  for row in rows:
    row.update(fields)
  return rows
