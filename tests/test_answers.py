"""Answer extraction (SPEC §2) and per-dataset answer checking (SPEC §8): the documented rules, real records, and
adversarial strings that must never raise."""

import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtt_jax.data.answers import DATASETS, check_answer, extract_answer, match_answer, normalize_answer
from tests.conftest import require_shared

BOT, EOT, EOS = '<|bot|>', '<|eot|>', '<|endoftext|>'

ADVERSARIAL = [
    '', ' ', '\n\t', EOT, EOS, BOT, EOT * 3, EOS + EOT, f'{EOT}{EOS}{EOT}', '<|eot', 'eot|>', '\x00', '\ufeff',
    '日本語の答え', '٣٤', '７２', '🙂' * 50, 'nan', 'NaN', 'inf', '-inf', 'Infinity', '1e400', '-1e400', '1e-400',
    '9' * 500, '-' + '9' * 500, '0.' + '0' * 500 + '1', '9' * 5000, '.' * 100, '-' * 100, '$' * 10, ',,,', '1,,,2',
    '--5', '+-3', '1.2.3', '0x1F', '1_000', '½', 'True' * 1000, 'False.', 'true\x00', 'Tom is a wumpus.' * 100,
    '\u2212' + '5', 'None', 'null', '{}', '[]', '\\', '"', "'", '\ud800', '#### ', '####', '72 ####',
]


def gold_completion(question: str, span: str, answer: str) -> str:
  return f'{question}\n{BOT}{span}{EOT} {answer}{EOS}'


# --- extract_answer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('completion, answer', [
    (f'{BOT}abc{EOT} 42{EOS}', '42'),  # the plain format
    (f'{BOT}abc{EOT} 42{EOS}{EOS}{EOS}', '42'),  # padding after the first <|endoftext|>
    (f'{BOT}abc{EOT} 42', '42'),  # truncated: no <|endoftext|>
    (f'{BOT}{EOT}  \n 42 \t{EOS}', '42'),  # stripped
    (f'{BOT}{EOT}{EOS}', ''),  # empty answer is '' (not None)
    (f'{BOT}{EOT}   {EOS} 42', ''),  # text after <|endoftext|> is not the answer
    (f'{BOT}a{EOT} 1{EOT} 2{EOS}', f'1{EOT} 2'),  # everything after the FIRST <|eot|>
    (f'{EOT}x{BOT}y{EOS}', f'x{BOT}y'),  # <|eot|> before <|bot|> still delimits the answer
    (f'q\n{BOT}日本{EOT} 答え 🙂{EOS}', '答え 🙂'),
])
def test_extract_answer_takes_text_after_first_eot_up_to_eos(completion, answer):
  assert extract_answer(completion) == answer


@pytest.mark.parametrize('completion', ['', '42', f'{BOT}abc 42{EOS}', f'{EOS}42', '<|eot', None, 42, b'<|eot|>1'])
def test_extract_answer_is_none_without_eot(completion):
  assert extract_answer(completion) is None


# --- normalize_answer / check_answer: the documented rules ----------------------------------------------------------


@pytest.mark.parametrize('text, value', [
    ('72', 72), ('$1,234.50 dollars', Decimal('1234.5')), ('#### 72', 72), ('The answer is 72.', 72),
    ('She earned $10.', 10), ('-5', -5), ('It is -5 degrees', -5), ('5-3', 3), ('0.5', Decimal('0.5')),
    ('.5', Decimal('0.5')), ('72.', 72), ('3 apples and 4 pears', 4), ('1,080', 1080), ('50%', 50),
    ('\u22125', -5), ('1e400', 400), ('9' * 500, Decimal('9' * 500)),
    ('no number', None), ('', None), ('nan', None), ('inf', None), ('-', None), ('７２', None),
])
def test_gsm8k_takes_last_number_without_commas_dollars_units(text, value):
  got = normalize_answer('gsm8k', text)
  assert got == value if value is not None else got is None


@pytest.mark.parametrize('predicted, reference, match', [
    ('72', '72', True), ('72.0', '72', True), ('$72', '72', True), ('72 dollars', '72', True),
    ('1,234.50', '1234.5', True), ('5000', '5,000', True), ('72.00001', '72', True),  # 1.4e-7 relative
    ('1000.05', '1000', True),  # 5e-5 relative: inside 1e-4
    ('1000.2', '1000', False),  # 2e-4 relative: outside
    ('448001', '448000', True),  # the rule is relative: above 10^4 an off-by-one integer is inside 1e-4
    ('72.01', '72', False), ('73', '72', False), ('-72', '72', False), ('0', '0', True), ('0.00001', '0', False),
    ('9' * 500, '9' * 500, True), ('9' * 499 + '8', '9' * 500, True),  # relative tolerance, exact Decimals
    ('8' + '9' * 499, '9' * 500, False), ('9' * 501, '9' * 500, False),
    (None, '72', False), ('', '72', False), ('72', 'no reference number', False), ('nan', 'nan', False),
])
def test_gsm8k_numeric_match_with_relative_tolerance(predicted, reference, match):
  assert check_answer('gsm8k', predicted, reference) is match


@pytest.mark.parametrize('predicted, match', [
    ('Tom is a wumpus.', True), ('tom is a wumpus', True), ('  TOM   is a\nWumpus .. ', True),
    ('Tom is a wumpus!', False), ('Tom is not a wumpus.', False), ('Tom is a lempus.', False), ('wumpus', False),
    ('', False), (None, False),
])
def test_prosqa_normalised_sentence_match(predicted, match):
  assert check_answer('prosqa', predicted, 'Tom is a wumpus.') is match
  assert check_answer('prosqa_mini', predicted, 'Tom is a wumpus.') is match  # the generated ProsQA: the same rule


@pytest.mark.parametrize('predicted, reference, match', [
    ('True', 'True', True), ('true', 'True', True), ('TRUE.', 'True', True), ('True, because', 'True', True),
    ('**False**', 'False', True), ('False', 'True', False), ('not true', 'True', False), ('Yes', 'True', False),
    ('Truely', 'True', False), ('', 'False', False), (None, 'False', False), ('True', 'maybe', False),
])
def test_prontoqa_first_word_true_false(predicted, reference, match):
  assert check_answer('prontoqa', predicted, reference) is match


@pytest.mark.parametrize('predicted, match', [
    ('1234', True), (' 1234 ', True), ('1234.', True), ('01234', True), ('+1234', True),
    ('1,234', False), ('1234.0', False), ('12 34', False), ('1234 apples', False), ('The sum is 1234', False),
    ('1235', False), ('-1234', False), ('', False), (None, False),
])
def test_addition_exact_integer(predicted, match):
  assert check_answer('addition', predicted, '1234') is match


def test_addition_huge_integers_are_exact():
  big = '9' * 5000  # beyond Python's int-from-str digit limit
  assert check_answer('addition', big, big)
  assert not check_answer('addition', big[:-1] + '8', big)


def test_dataset_name_is_case_insensitive_and_unknown_raises_listing_names():
  assert check_answer('GSM8K', '72', '72')
  with pytest.raises(ValueError, match='gsm8k, prosqa, prontoqa, addition'):
    check_answer('mathqa', '72', '72')
  with pytest.raises(ValueError, match='known'):
    normalize_answer('', '72')


# --- exact (COCONUT) vs lenient match -----------------------------------------------------------------------------


@pytest.mark.parametrize('dataset,predicted,reference,exact,lenient', [
    ('prontoqa', 'True, because every cat is a wumpus', 'True', False, True),
    ('prontoqa', 'true', 'True', False, True),
    ('prontoqa', ' True ', 'True', True, True),
    ('gsm8k', '72.00001', '72', False, True),
    ('gsm8k', '72.0', '72', False, True),
    ('gsm8k', '1,234', '1234', True, True),
    ('gsm8k', 'The answer is 72', '72', False, True),
    ('prosqa', 'Tom is a wumpus', 'Tom is a wumpus.', False, True),
    ('prosqa', 'Tom is a wumpus.', 'Tom is a wumpus.', True, True),
    ('addition', '046', '46', False, True),
    ('addition', None, '46', False, False),
])
def test_exact_match_is_coconuts_string_equality(dataset, predicted, reference, exact, lenient):
  """'exact' is COCONUT's evaluation (`answer_output == answer`, both with commas removed and stripped); 'lenient'
  is the per-dataset rule above, which accepts a first word, a close number or a missing period."""
  assert match_answer(dataset, predicted, reference, 'exact') is exact
  assert match_answer(dataset, predicted, reference, 'lenient') is lenient
  assert match_answer(dataset, predicted, reference) is lenient  # the default: SPEC §8's rules
  with pytest.raises(ValueError, match="Unknown answer match 'fuzzy'; expected one of exact, lenient"):
    match_answer(dataset, predicted, reference, 'fuzzy')


# --- never raises -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('dataset', DATASETS)
def test_adversarial_strings_never_raise(dataset):
  """Every pair of adversarial strings, as completion, answer and reference, gives a bool."""
  for text in ADVERSARIAL:
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    normalize_answer(dataset, text)
    for reference in ADVERSARIAL:
      assert isinstance(check_answer(dataset, text, reference), bool)
      assert isinstance(match_answer(dataset, text, reference, 'exact'), bool)
      assert isinstance(check_answer(dataset, extract_answer(f'{BOT}{reference}{EOT}{text}'), reference), bool)


def test_million_digit_number_is_fast():
  """Huge numbers are compared as exact Decimals (no int conversion, which is quadratic), so this takes ms."""
  big = '7' * 1_000_000
  for dataset in ('gsm8k', 'addition'):
    assert check_answer(dataset, big, big)
    assert not check_answer(dataset, '1' + big, big)


PIECES = st.sampled_from([BOT, EOT, EOS, '$', ',', '.', '-', ' ', '####', 'True', 'false', 'nan', 'e', '1e400',
                          '9' * 400, 'Tom is a wumpus.', '\u2212', '٣'])
TEXTS = st.lists(st.one_of(PIECES, st.text(max_size=12), st.integers().map(str), st.floats().map(str)),
                 max_size=12).map(''.join)


@settings(max_examples=300, deadline=None)
@given(dataset=st.sampled_from(DATASETS), completion=TEXTS, reference=TEXTS)
def test_random_strings_never_raise_and_match_themselves(dataset, completion, reference):
  """Random text never raises; an answer with a canonical value always matches itself (reflexivity)."""
  answer = extract_answer(completion)
  assert answer is None or (isinstance(answer, str) and answer == answer.strip())
  assert isinstance(check_answer(dataset, answer, reference), bool)
  assert check_answer(dataset, reference, reference) is (normalize_answer(dataset, reference) is not None)


# --- real records -------------------------------------------------------------------------------------------------

HAND_WRITTEN = [  # always run: records in the real formats
    ('gsm8k', 'Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72',
     '72', '73'),
    ('gsm8k', '<<2*2500=5000>>', '5,000', '5,001'),
    ('prosqa', 'Every zhorpus is a wumpus.', 'Tom is a wumpus.', 'Tom is a lempus.'),
    ('prontoqa', 'Max is a yumpus. Every yumpus is a dumpus.', 'True', 'False'),
    ('addition', '7+5=12 write 2 carry 1 | 3+4+1=8 write 8', '82', '83'),
]


def check_gold_and_wrong(dataset, span, answer, wrong):
  """The gold completion's extracted answer is the reference and matches it; a wrong answer does not."""
  extracted = extract_answer(gold_completion('question?', span, answer))
  assert extracted == answer.strip()
  assert check_answer(dataset, extracted, answer)
  assert not check_answer(dataset, extract_answer(gold_completion('question?', span, wrong)), answer)


@pytest.mark.parametrize('dataset, span, answer, wrong', HAND_WRITTEN)
def test_hand_written_records(dataset, span, answer, wrong):
  check_gold_and_wrong(dataset, span, answer, wrong)


def test_gsm8k_openai_solutions_end_in_their_answer():
  """On all 7473 GSM8K train solutions the last-number rule reads the `#### answer` out of the full solution."""
  path = require_shared('gsm8k', 'openai_grade_school_math', 'train.jsonl')
  with open(path) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 7473
  for r in records:
    final = r['answer'].split('####')[-1].strip()
    assert check_answer('gsm8k', r['answer'], final), r['answer']
    check_gold_and_wrong('gsm8k', '', final, str(2 * normalize_answer('gsm8k', final) + 1))


@pytest.mark.parametrize('dataset, parts', [
    ('gsm8k', ('gsm8k', 'coconut_format', 'gsm_valid.json')),
    ('prosqa', ('prosqa', 'prosqa_valid.json')),
    ('prontoqa', ('prontoqa', 'prontoqa_valid.json')),
])
def test_real_valid_records(dataset, parts):
  """Every valid record's gold completion matches its answer and not a different record's answer."""
  with open(require_shared(*parts)) as f:
    records = json.load(f)
  answers = [r['answer'] for r in records]
  for i, r in enumerate(records):
    span = ' '.join(r['steps'])
    wrong = next((a for a in answers[i + 1:] + answers[:i] if normalize_answer(dataset, a)
                  != normalize_answer(dataset, r['answer'])), None)
    assert wrong is not None
    check_gold_and_wrong(dataset, span, r['answer'], wrong)
