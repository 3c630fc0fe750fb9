"""`python -m dtt_jax.generate` on a tiny trained DTT workdir (the quickstart config, 150 bootstrap steps: every
completion opens a span the gate feeds back): the command prints the evaluation report's completions, tokens, gates
and latent lens for the report's questions, the bootstrap stage too; `--budget` cuts the span where the unbudgeted
decoding had it continue; each bad input stops with its message (exit status 1 from the command). A tiny COCONUT
run (tests/test_coconut_pipeline.py's, 12 steps) decodes its evaluation's questions to the report's rows too, and
its budget sets the number of continuous thoughts. The thinking tokens' decoding: tests/test_think_tokens.py."""

import io
import json
import shutil
import subprocess
import sys

import pytest

from dtt_jax import generate, pipeline, tokens
from tests.conftest import PROJECT_ROOT
from tests.test_coconut_pipeline import _tiny_config as coconut_config
from tests.test_main import _env

TINY = [
    '--config.model.n_layer=1', '--config.model.n_embd=32', '--config.model.n_head=2', '--config.model.n_positions=32',
    '--config.dataset.train_size=400', '--config.dataset.valid_size=16', '--config.eval.size=16',
    '--config.bootstrap.steps=150', '--config.bootstrap.eval_every=150', '--config.bootstrap.checkpoint_every=150',
    '--config.bootstrap.warmup_steps=1', '--config.bootstrap.batch_size=16', '--config.grpo.steps=2',
    '--config.grpo.prompts_per_step=4', '--config.grpo.num_generations=4', '--config.grpo.eval_every=2',
    '--config.grpo.warmup_steps=1', '--config.generate.batch_size=16',
]  # max_new_tokens 14, prompts of up to 8 tokens: at most 18 tokens fit the 32 positions


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp('generate') / 'quickstart'
  proc = subprocess.run([sys.executable, '-m', 'dtt_jax.main', '--config=configs/quickstart.py', f'--workdir={path}',
                         *TINY], cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return path


def _report(workdir, stage):
  with open(workdir / 'eval' / 'test' / stage / 'completions.jsonl') as f:
    return [json.loads(line) for line in f]


def _cli(workdir, *args):
  return subprocess.run([sys.executable, '-m', 'dtt_jax.generate', f'--workdir={workdir}', *args], cwd=PROJECT_ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600)


FIELDS = ('completion', 'answer', 'tokens', 'gates', 'latent_lens', 'step')


def test_command_prints_the_evaluation_reports_completions(workdir):
  report = _report(workdir, 'grpo')
  assert all(r['completion'].startswith('<|bot|>') and r['reasoning_tokens'] >= 3 for r in report)
  proc = _cli(workdir, '--json', *[r['question'] for r in report])
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [r['prompt'] for r in rows] == [r['question'] for r in report]
  for row, want in zip(rows, report):
    assert (row['method'], row['stage']) == ('dtt', 'grpo')  # the last trained stage by default
    assert {k: row[k] for k in FIELDS} == {k: want[k] for k in FIELDS}, row['prompt']
    assert row['forced'] == []


def test_bootstrap_stage_and_budget(workdir):
  report = _report(workdir, 'bootstrap')
  questions = [r['question'] for r in report]
  rows = generate.generate(str(workdir), questions, stage='bootstrap')
  for row, want in zip(rows, report):
    assert {k: row[k] for k in FIELDS} == {k: want[k] for k in FIELDS}, row['prompt']
  # --budget=2: the same tokens up to two span tokens, then <|eot|> forced where the span went on
  for row, free in zip(generate.generate(str(workdir), questions, stage='bootstrap', budget=2), rows):
    assert free['tokens'].index('<|eot|>') > 3
    assert row['tokens'][:4] == free['tokens'][:3] + ['<|eot|>'] and row['forced'] == [3], row['prompt']
  for row in generate.generate(str(workdir), questions[:2], stage='bootstrap', budget=0):
    assert row['tokens'][:2] == ['<|bot|>', '<|eot|>'] and row['forced'] == [1]
  with pytest.raises(ValueError, match=r'^--budget=-1: expected a number of reasoning positions >= 0\.$'):
    generate.generate(str(workdir), questions[:1], budget=-1)


def test_coconut_run(tmp_path, hf_tokenizer):
  del hf_tokenizer  # the shared tokenizer must be present
  pipeline.run(coconut_config(), str(tmp_path))
  with open(tmp_path / 'eval' / 'valid' / 'bootstrap' / 'completions.jsonl') as f:
    report = [json.loads(line) for line in f]
  rows = generate.generate(str(tmp_path), [r['question'] for r in report])
  assert len(rows) == len(report) == 8
  for row, want in zip(rows, report):
    assert {k: row[k] for k in FIELDS} == {k: want[k] for k in FIELDS}, row['prompt']
    assert row['checkpoint'].endswith('curriculum stage 2')  # the final stage: K = 1 thought
  row = generate.generate(str(tmp_path), [report[0]['question']], budget=3)[0]
  assert row['tokens'][:5] == [tokens.BOT] + [tokens.LATENT] * 3 + [tokens.EOT] and row['forced'] == [0, 1, 2, 3, 4]
  assert [entry['position'] for entry in row['latent_lens']] == [1, 2, 3] and row['gates'][1:4] == [1.0] * 3


def test_table_of_a_decoded_prompt():
  row = {'prompt': '4 + 5 =', 'completion': '<|bot|>4 5<|eot|>9<|endoftext|>', 'answer': '9',
         'tokens': ['<|bot|>', '4', ' 5', '<|eot|>', '9', '<|endoftext|>'],
         'gates': [0.0, 0.9876, 1.0, 0.0, 0.0, 0.0], 'forced': [3],
         'latent_lens': [{'position': 1, 'gate': 0.9876, 'top': [['4', 0.9], [' 5', 0.05]]},
                         {'position': 2, 'gate': 1.0, 'top': [[' 5', 0.61], ['4', 0.3]]}]}
  assert generate.format_row(row).splitlines() == [
      '4 + 5 =',
      "  completion  '<|bot|>4 5<|eot|>9<|endoftext|>'",
      "  answer      '9'",
      '  position  token            gate    latent lens',
      '         0  "<|bot|>"        0.000',
      '         1  "4"              0.988   "4" 0.90',
      '         2  " 5"             1.000   " 5" 0.61',
      '         3  "<|eot|>"        0.000   (forced)',
      '         4  "9"              0.000',
      '         5  "<|endoftext|>"  0.000']


def test_bad_input_is_named(workdir, tmp_path):
  with pytest.raises(ValueError, match=r'^Prompt 2 is empty: give the question text'):
    generate.read_prompts(['1 + 2 =', '  '])
  with pytest.raises(ValueError, match=r'^No prompt: give questions as arguments, --file=PATH or on stdin'):
    generate.read_prompts([], stdin=io.StringIO('\n\n'))
  assert generate.read_prompts([], stdin=io.StringIO('1 + 2 =\n\n3 + 4 =\n')) == ['1 + 2 =', '3 + 4 =']
  with pytest.raises(ValueError, match=r"^Prompt 1 \('Zanzibar quokka'\) has tokens outside this model's compact "
                                       r"vocabulary \(\d+ tokens, made from its training data\): 'Z', 'anz'"):
    generate.generate(str(workdir), ['Zanzibar quokka'])
  long = ' + '.join(['1'] * 10) + ' ='  # 10 ones, 9 ' +', ' =' and the newline: 21 tokens
  with pytest.raises(ValueError, match=r"^Prompt 2 \('1 \+ 1 .* ='\) has 21 tokens; with 14 generated tokens the "
                                       r"model's 32 positions allow prompts of at most 18\.$"):
    generate.generate(str(workdir), ['1 + 2 =', long])
  with pytest.raises(ValueError, match=r"^--stage=think: .* has checkpoints of bootstrap, grpo only\.$"):
    generate.generate(str(workdir), ['1 + 2 ='], stage='think')
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  with pytest.raises(FileNotFoundError, match=r'config.json is missing: .* is not a dtt_jax workdir'):
    generate.generate(str(untrained), ['1 + 2 ='])
  for name in ('config.json', 'vocab.json'):
    shutil.copy(workdir / name, untrained / name)
  with pytest.raises(FileNotFoundError, match=r'untrained has no checkpoint of bootstrap, grpo: train it first'):
    generate.generate(str(untrained), ['1 + 2 ='])
  # the command: the message as one line on stderr, exit status 1
  proc = _cli(workdir, 'Zanzibar quokka')
  assert proc.returncode == 1 and proc.stdout == ''
  assert proc.stderr.strip().splitlines()[-1].startswith("dtt_jax.generate: Prompt 1 ('Zanzibar quokka') has tokens "
                                                         "outside this model's compact vocabulary")
  assert 'Traceback' not in proc.stderr
