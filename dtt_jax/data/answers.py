"""Answer extraction and per-dataset answer checking (SPEC §2, §8), shared by the reward and evaluation.

Pure functions on strings. They never raise on model output: any string (empty, unicode, huge numbers, several
`<|eot|>`) gives a defined result. The errors are an unknown dataset name or match rule (programming errors).

Rules, per dataset (`normalize_answer` gives the canonical value, None when the text has none; None never matches):
* gsm8k: `$` and `,` are removed, then the **last** number in the text is the answer, so `$1,234.50 dollars`,
  `#### 72`, `The answer is 72.` and a full GSM8K solution ending in `#### 72` all work. A number is ASCII digits
  with an optional decimal part (`72`, `0.5`, `.5`, `72.`) and a `-` sign unless the `-` follows a letter, digit or
  `.` (so `5-3` reads 3, `is -5` reads -5). No scientific notation (`1e400` reads 400), no `nan`/`inf`, no
  fractions (`1/2` reads 2). Values are exact `Decimal`s; a match is `|p - r| <= 1e-4 * max(|p|, |r|)` (SPEC §8).
  The tolerance is relative, so above 10^4 an integer off by one matches (448001 vs 448000).
* prosqa, prosqa_mini: the sentence lowercased, whitespace collapsed, trailing periods removed; match is string equality
  (`tom  is a Wumpus` matches `Tom is a wumpus.`).
* prontoqa: the first word, punctuation around it removed, case-insensitive: `true` -> True, `false` -> False,
  anything else -> None (`True, because ...` is True; `not true` is None).
* addition: the whole answer must be an integer literal (`[+-]?[0-9]+`, surrounding whitespace and one trailing
  `.` allowed; no commas, no decimals, no extra words); exact integer match (leading zeros are allowed).

These rules are the 'lenient' match (SPEC §8; DTT's reward and evaluation). `match_answer` also offers 'exact',
COCONUT's evaluation (its run.py): both strings with `,` removed and surrounding whitespace stripped must be equal,
for every dataset (`True, because ...` is not `True`; `72.0` is not `72`; `Tom is a wumpus` is not
`Tom is a wumpus.`).
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal

from dtt_jax.tokens import EOS, EOT

DATASETS = ('gsm8k', 'prosqa', 'prontoqa', 'addition', 'prosqa_mini')
MATCHES = ('exact', 'lenient')  # `match_answer` rules
GSM8K_RELATIVE_TOLERANCE = Decimal('1e-4')

# Optional '-' (not after a letter, digit or '.'), then digits with an optional decimal part, or '.digits'.
_NUMBER = re.compile(r'(?:(?<![0-9A-Za-z.])-)?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)')
_INTEGER = re.compile(r'[+-]?[0-9]+')
# Enough precision for a 1e-4 relative comparison; exponents unbounded and no traps, so nothing overflows or raises.
_CONTEXT = decimal.Context(prec=34, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])


def extract_answer(completion: str) -> str | None:
  """The text after the first `<|eot|>`, up to the first `<|endoftext|>` after it, stripped (SPEC §2).

  None when there is no `<|eot|>` (or the input is not a string); '' when the answer is empty.
  """
  if not isinstance(completion, str):
    return None
  _, eot, tail = completion.partition(EOT)
  if not eot:
    return None
  return tail.split(EOS, 1)[0].strip()


def validate_dataset(dataset: str) -> str:
  """The canonical (lowercase) dataset name; ValueError naming the known ones if it is not one of them."""
  name = dataset.lower() if isinstance(dataset, str) else dataset
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {dataset!r} for answer checking; known: {", ".join(DATASETS)}.')
  return name


def _last_number(text: str) -> Decimal | None:
  text = text.replace('\u2212', '-').replace('$', '').replace(',', '')
  last = None
  for last in _NUMBER.finditer(text):
    pass
  return None if last is None else Decimal(last.group())


def _integer(text: str) -> Decimal | None:
  text = text.strip()
  text = text[:-1].rstrip() if text.endswith('.') else text
  return Decimal(text) if _INTEGER.fullmatch(text) else None


def _sentence(text: str) -> str | None:
  text = ' '.join(text.lower().split()).rstrip('. ')
  return text or None


def _true_false(text: str) -> bool | None:
  words = text.split(maxsplit=1)
  if not words:
    return None
  word = re.sub(r'^\W+|\W+$', '', words[0]).lower()
  return {'true': True, 'false': False}.get(word)


_NORMALIZERS = {'gsm8k': _last_number, 'prosqa': _sentence, 'prontoqa': _true_false, 'addition': _integer,
                'prosqa_mini': _sentence}


def normalize_answer(dataset: str, text: str | None) -> Decimal | str | bool | None:
  """Canonical value of an answer: Decimal (gsm8k, addition), str (prosqa), bool (prontoqa); None if none."""
  normalize = _NORMALIZERS[validate_dataset(dataset)]
  if not isinstance(text, str):
    return None
  return normalize(text)


def _close(predicted: Decimal, reference: Decimal) -> bool:
  if predicted == reference:
    return True
  with decimal.localcontext(_CONTEXT):
    scale = max(abs(predicted), abs(reference))
    return abs(predicted - reference) <= GSM8K_RELATIVE_TOLERANCE * scale


def check_answer(dataset: str, predicted: str | None, reference: str) -> bool:
  """Whether the predicted answer text matches the reference answer under the dataset's rule (module doc).

  `predicted` is the extracted answer (see `extract_answer`; None means no answer and never matches).
  Raises ValueError only for an unknown dataset name.
  """
  name = validate_dataset(dataset)
  want = normalize_answer(name, reference)
  got = normalize_answer(name, predicted)
  if want is None or got is None:
    return False
  if name == 'gsm8k':
    return _close(got, want)
  return got == want


def exact_text(text: str) -> str:
  """COCONUT's normal form of an answer string: commas removed, surrounding whitespace stripped."""
  return text.replace(',', '').strip()


def match_answer(dataset: str, predicted: str | None, reference: str, rule: str = 'lenient') -> bool:
  """`rule='exact'`: `exact_text(predicted) == exact_text(reference)` (COCONUT's run.py); 'lenient':
  `check_answer` (the per-dataset rules of the module docstring). None never matches. ValueError for an unknown
  dataset or rule."""
  name = validate_dataset(dataset)
  if rule == 'lenient':
    return check_answer(name, predicted, reference)
  if rule != 'exact':
    raise ValueError(f'Unknown answer match {rule!r}; expected one of {", ".join(MATCHES)}.')
  return isinstance(predicted, str) and exact_text(predicted) == exact_text(reference)
