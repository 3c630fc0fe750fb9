"""The README's main job (configs/quickstart.py) end to end at reduced steps through the real CLI: it ends with the
summary (one line per stage and per evaluation), writes the training curves, the evaluation reports and the logs,
and its workdir exports to a transformers model; the summary's robustness to stages
that did not run; the quickstart's data options (column digits or the answer's digits as the span, one token per
digit)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dtt_jax.eval import summary
from tests.conftest import PROJECT_ROOT
from tests.test_main import _env, _has_wandb

REDUCED = [
    '--config.dataset.train_size=400', '--config.dataset.valid_size=16', '--config.eval.size=16',
    '--config.bootstrap.steps=6', '--config.bootstrap.eval_every=3', '--config.bootstrap.log_every=1',
    '--config.bootstrap.warmup_steps=1', '--config.grpo.steps=2', '--config.grpo.prompts_per_step=4',
    '--config.grpo.num_generations=4', '--config.grpo.eval_every=2', '--config.grpo.log_every=1',
    '--config.grpo.warmup_steps=1', '--config.generate.batch_size=16',
]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def test_quickstart_end_to_end_writes_summary_curves_reports_and_exports(tmp_path):
  workdir = tmp_path / 'quickstart'
  wandb = ('--config.wandb.enabled=true',) if _has_wandb() else ()
  proc = subprocess.run([sys.executable, '-m', 'dtt_jax.main', '--config=configs/quickstart.py',
                         f'--workdir={workdir}', *REDUCED, *wandb], cwd=PROJECT_ROOT, env=_env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  text = (workdir / summary.SUMMARY).read_text()
  assert text in proc.stdout  # printed at the end of the run
  lines = text.splitlines()
  assert lines[0] == f'Summary of {workdir}'
  by_stage = {line.split()[0]: line for line in lines[1:]}
  assert by_stage['bootstrap'].startswith('bootstrap  6 steps, validation at step 6: accuracy ')
  assert by_stage['grpo'].startswith('grpo       2 steps, validation at step 2: accuracy ')
  evals = [line for line in lines if line.startswith('eval ')]
  assert [line.split(':')[0] for line in evals] == ['eval       bootstrap on 16 test examples',
                                                    'eval       grpo on 16 test examples']
  for line in [by_stage['bootstrap'], by_stage['grpo']] + evals:
    for label in ('accuracy', 'tokens', 'reasoning', 'gate inner', 'outer'):
      value = line.split(f' {label} ')[1].split(',')[0].split()[0]
      assert float(value) >= 0, (label, line)
  png = workdir / 'eval' / summary.CURVES
  assert lines[-1] == f'curves: {png}'
  assert png.read_bytes()[:8] == PNG_MAGIC

  for stage in ('bootstrap', 'grpo'):  # each trained stage, on 16 problems of the test split (config.eval)
    out_dir = workdir / 'eval' / 'test' / stage
    metrics = json.loads((out_dir / 'metrics.json').read_text())
    for key in ('accuracy', 'structure_rate', 'reasoning_tokens', 'reward_structure', 'reward_correctness',
                'reward_efficiency', 'reward_gate', 'gate_inner_mean', 'gate_outer_std', 'gate_outer_max'):
      assert key in metrics
    assert metrics['stage'] == stage and metrics['num_examples'] == 16 and metrics['split'] == 'test'
    assert metrics['step'] == (6 if stage == 'bootstrap' else 2) or 'best by' in metrics['checkpoint']
    rows = [json.loads(line) for line in open(out_dir / 'completions.jsonl')]
    assert len(rows) == 16 and {'id', 'question', 'completion', 'correct', 'generated_tokens', 'reasoning_tokens',
                                'gates', 'tokens', 'latent_lens', 'stage', 'step', 'config'} <= set(rows[0])
    assert rows[0]['stage'] == stage and len(rows[0]['tokens']) == len(rows[0]['gates'])
    for name in ('completions.csv', 'gate_histogram.png', 'reasoning_lengths.png', 'gates_over_tokens.png'):
      assert (out_dir / name).stat().st_size > 0
  logged = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert any('bootstrap/loss' in r for r in logged) and any('grpo/valid/reward' in r for r in logged)
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir / 'tensorboard'))
  if wandb:  # offline run directory with the logged history
    assert any(d.startswith('offline-run-') for d in os.listdir(workdir / 'wandb'))

  out = tmp_path / 'hf'
  proc = subprocess.run([sys.executable, '-m', 'dtt_jax.export', f'--workdir={workdir}', f'--out={out}'],
                        cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {'config.json', 'model.safetensors', 'dtt_head.safetensors', 'dtt_vocab.json'} <= set(os.listdir(out))
  transformers = pytest.importorskip('transformers')
  model = transformers.GPT2LMHeadModel.from_pretrained(out)
  assert model.config.vocab_size == len(json.loads((out / 'dtt_vocab.json').read_text())['gpt2_ids'])


def _write_metrics(workdir, records):
  with open(workdir / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps({'time': 0.0, **r}) + '\n' for r in records)


def test_summary_of_a_bootstrap_only_run_and_of_an_empty_workdir(tmp_path):
  empty = summary.write_summary(str(tmp_path), echo=False)
  assert empty.splitlines()[1] == f'Nothing trained or evaluated yet in {tmp_path}.'
  assert not (tmp_path / 'eval' / summary.CURVES).exists()

  _write_metrics(tmp_path, [
      {'step': 1, 'bootstrap/loss': 3.0, 'bootstrap/tau': 2.0},
      {'step': 10, 'bootstrap/valid/accuracy': 0.25, 'bootstrap/valid/reasoning_tokens': 3.0},
      {'step': 10, 'bootstrap/loss': 2.0, 'bootstrap/tau': 1.0},
      {'step': 10, 'bootstrap/valid/accuracy': 0.5, 'bootstrap/valid/reasoning_tokens': 3.0},  # a rerun: counts
  ])
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 11, "bootstrap/lo\n')  # a line cut by a kill: skipped
  lines = summary.write_summary(str(tmp_path), echo=False).splitlines()
  assert lines[1:] == [
      'bootstrap  10 steps, validation at step 10: accuracy 0.500, tokens -, reasoning 3.0, gate inner -, outer -',
      f'curves: {tmp_path / "eval" / summary.CURVES}']
  assert (tmp_path / 'eval' / summary.CURVES).read_bytes()[:8] == PNG_MAGIC


def test_answer_digit_span_and_digit_tokens(hf_tokenizer):
  from dtt_jax import tokens  # pylint: disable=g-import-not-at-top
  from dtt_jax.data import generators, samples  # pylint: disable=g-import-not-at-top
  records = [generators.addition_record(47, 85), generators.addition_record(12, 30)]
  tok = tokens.Tokenizer(hf_tokenizer, samples.compact_vocab(generators.generate_addition(500, max_digits=2) + records,
                                                             hf_tokenizer))

  def pieces(cfg):
    batch = samples.stage1_batch(records, tok, cfg)
    return [[tok.decode([i]) for i in row[:n]] for row, n in zip(batch.completion, batch.completion_mask.sum(1))]

  default = samples.SampleConfig(8, 12, 'cot', span_text='answer_digits')
  assert pieces(default) == [['<|bot|>', '2', ' 3', ' 1', '<|eot|>', '132', '<|endoftext|>'],
                             ['<|bot|>', '2', ' 4', '<|eot|>', '42', '<|endoftext|>']]
  digits = samples.SampleConfig(8, 12, 'cot', span_text='answer_digits', digit_tokens=True)
  assert pieces(digits) == [['<|bot|>', '2', ' 3', ' 1', '<|eot|>', '1', '3', '2', '<|endoftext|>'],
                            ['<|bot|>', '2', ' 4', '<|eot|>', '4', '2', '<|endoftext|>']]
  columns = samples.SampleConfig(8, 14, 'cot', span_text='column_digits', digit_tokens=True)
  assert pieces(columns) == [
      ['<|bot|>', '7', ' 5', ' 2', ' 4', ' 8', ' 3', ' 1', '<|eot|>', '1', '3', '2', '<|endoftext|>'],
      ['<|bot|>', '2', ' 0', ' 2', ' 1', ' 3', ' 4', '<|eot|>', '4', '2', '<|endoftext|>']]
  assert samples.column_digits(generators.addition_record(347, 285)['steps']) == '7 5 2 4 8 3 3 2 6'
  with pytest.raises(ValueError, match='data.span_text="column_digits" needs the steps of generated addition'):
    samples.encode_stage1([{'question': 'q', 'steps': ['think'], 'answer': '1'}], tok, columns)
  with pytest.raises(ValueError, match='data.span_text="answer_digits" needs non-negative integer answers'):
    samples.encode_stage1([{'question': 'q', 'steps': [], 'answer': 'True'}], tok, digits)
  text = '7+5=12 write 2 carry 1\n4+8+1=13'
  ids = samples.digit_gpt2_ids(hf_tokenizer, [text, ''])
  assert hf_tokenizer.decode(ids[0].tolist()) == text and ids[1].shape == (0,)
  assert all(len(hf_tokenizer.decode([i]).strip()) == 1 for i in ids[0] if hf_tokenizer.decode([i]).strip().isdigit())
  # The defaults are unchanged: the steps as the span, GPT-2's BPE.
  steps = samples.SampleConfig(8, 40, 'cot')
  assert pieces(steps)[0][4:6] == ['=', '12'] and pieces(steps)[0][-2] == '132'
  np.testing.assert_array_equal(samples.encode_stage1(records, tok, steps).answers[0], tok.encode('132'))
