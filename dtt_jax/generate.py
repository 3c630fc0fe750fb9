"""Ask a trained model questions of one's own: decode prompts with a workdir's checkpoint, any method, and print
the completion, the answer and, per generated position, the token, the gate and the latent lens's top token.

    python -m dtt_jax.generate --workdir=runs/quickstart "47 + 85 =" "12 + 30 ="
    python -m dtt_jax.generate --workdir=runs/quickstart --stage=bootstrap --checkpoint=latest --budget=3 "47 + 85 ="
    python -m dtt_jax.generate --workdir=runs/quickstart --file=questions.txt --json    # one question per line
    echo "47 + 85 =" | python -m dtt_jax.generate --workdir=runs/quickstart              # stdin: no prompt given

A prompt is a question as the dataset writes it, encoded as the evaluation encodes questions (`question\\n`,
left-padded to at least `data.max_prompt_len`). The decoding is the method's evaluation's (`Method.decode`): DTT
greedy with gate noise off at the stage's `tau_min`; COCONUT and its baselines with the head of the curriculum stage
the checkpoint was trained at; thinking tokens from the policy, at most `think.max_think` in a row. So the same
question gives the completion of the evaluation report (`eval/<split>/<stage>/completions.jsonl`).

`--stage` (default: the method's last trained stage) and `--checkpoint` ('best' by validation, 'latest' or a step)
pick the checkpoint. `--temperature` > 0 samples the tokens (with `--top_k`, `--top_p`, `--seed`; the gate stays
noise-free). `--budget=k` forces the end of the reasoning after k positions: DTT's `<|eot|>` after k span tokens (0:
the completion starts `<|bot|><|eot|>`), COCONUT's k continuous thoughts (pause-as-thought's and Pause's k pauses),
at most k thinking tokens in a row. `--max_new_tokens` (0: `generate.max_new_tokens`). `--json`: one JSON object per
prompt (prompt, completion, answer, tokens, gates, latent_lens, forced, method, stage, step, checkpoint).

Bad input (an empty prompt, one longer than the model's positions allow, text outside a compact vocabulary, a
workdir without checkpoints, an unknown stage) stops with one line naming it, and exit status 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from dtt_jax import data as data_lib
from dtt_jax import methods, pipeline
from dtt_jax.checkpoint import CheckpointError
from dtt_jax.eval import budget as budget_lib
from dtt_jax.methods import base
from dtt_jax.model import hf_io
from dtt_jax.sampling.sampler import SamplingConfig

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined when it runs, so that importing this module defines none: dtt_jax.export has a
  --workdir too)."""
  flags.DEFINE_string('workdir', None, 'Workdir of a training run.')
  flags.DEFINE_string('stage', '', "The stage whose checkpoint decodes ('' = the method's last trained stage).")
  flags.DEFINE_string('checkpoint', 'best', "'best' (by validation), 'latest' or a step number.")
  flags.DEFINE_integer('budget', None, 'Force the end of the reasoning after this many positions (default: none).')
  flags.DEFINE_integer('max_new_tokens', 0, 'Most tokens generated (0: the config\'s generate.max_new_tokens).')
  flags.DEFINE_float('temperature', 0.0, '0: greedy; > 0: sample at this temperature.')
  flags.DEFINE_integer('top_k', 0, 'Sampling: keep the k most likely tokens (0: all).')
  flags.DEFINE_float('top_p', 1.0, 'Sampling: nucleus probability (1: all).')
  flags.DEFINE_integer('seed', 0, 'Sampling: the random seed.')
  flags.DEFINE_string('file', '', 'A text file with one prompt per line (instead of arguments).')
  flags.DEFINE_bool('json', False, 'Print one JSON object per prompt instead of the table.')
  flags.mark_flags_as_required(['workdir'])


def read_prompts(args: Sequence[str], path: str = '', stdin=None) -> list[str]:
  """The prompts: the arguments, else the lines of `path`, else of `stdin` (blank lines skipped in both)."""
  if args and path:
    raise ValueError(f'Prompts given both as arguments and as --file={path}: give one of them.')
  if args:
    texts = list(args)
  elif path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'--file={path}: no such file (expected one prompt per line).')
    with open(path, encoding='utf-8') as f:
      texts = [line for line in f.read().splitlines() if line.strip()]
  else:
    texts = [line for line in (stdin or sys.stdin).read().splitlines() if line.strip()]
  if not texts:
    raise ValueError('No prompt: give questions as arguments, --file=PATH or on stdin, e.g. "47 + 85 =".')
  for i, text in enumerate(texts):
    if not text.strip():
      raise ValueError(f'Prompt {i + 1} is empty: give the question text, e.g. "47 + 85 =".')
  return texts


def max_positions(config) -> int | None:
  """The model's positions: `model.n_positions` of a model trained from scratch, else its checkpoint directory's
  config.json (None for a hub name: not checked)."""
  m = config.model
  if m.init == 'scratch':
    return m.n_positions
  if os.path.isdir(m.init):
    hf = hf_io.read_config_json(m.init)
    return hf.get('n_positions', hf.get('max_position_embeddings'))
  return None


def encode_prompts(exp: base.Experiment, texts: Sequence[str], max_new_tokens: int) -> data_lib.Prompts:
  """Prompts [N, max(data.max_prompt_len, longest)] as the evaluation builds them (`data.build_prompts`); a text
  outside the vocabulary or too long for the model's positions with `max_new_tokens` generated raises ValueError
  naming it."""
  tokenizer, records = exp.tokenizer, [{'question': t, 'steps': [], 'answer': ''} for t in texts]
  limit = max_positions(exp.config)
  longest = 0
  for i, record in enumerate(records):
    text = data_lib.record_texts(record)[0]
    try:
      n = len(tokenizer.encode(text))
    except KeyError:
      outside = [tokenizer.hf.decode([g]) for g in tokenizer.encode_gpt2(text) if not _in_vocab(tokenizer, g)]
      raise ValueError(f'Prompt {i + 1} ({texts[i]!r}) has tokens outside this model\'s compact vocabulary '
                       f'({tokenizer.vocab.num_tokens} tokens, made from its training data): '
                       f'{", ".join(map(repr, outside))}. Use the words and symbols of the dataset.') from None
    if limit is not None and n + max_new_tokens > limit:
      shown = texts[i] if len(texts[i]) <= 40 else texts[i][:40] + '...'
      raise ValueError(f'Prompt {i + 1} ({shown!r}) has {n} tokens; with {max_new_tokens} generated '
                       f'tokens the model\'s {limit} positions allow prompts of at most {limit - max_new_tokens}.')
    longest = max(longest, n)
  return data_lib.build_prompts(records, tokenizer, max(exp.config.data.max_prompt_len, longest))


def _in_vocab(tokenizer, gpt2_id: int) -> bool:
  try:
    tokenizer.vocab.to_model([gpt2_id])
    return True
  except KeyError:
    return False


def generate(workdir: str, texts: Sequence[str], stage: str = '', checkpoint: str = 'best', budget: int | None = None,
             max_new_tokens: int = 0, sampling: SamplingConfig | None = None, seed: int = 0) -> list[dict]:
  """Decodes `texts` with the workdir's checkpoint -> one row per text: prompt, completion, answer, tokens (and with
  a gate: gates, latent_lens, forced), method, stage, step, checkpoint."""
  if budget is not None and budget < 0:
    raise ValueError(f'--budget={budget}: expected a number of reasoning positions >= 0.')
  exp = pipeline.open_workdir(workdir)
  stage = budget_lib.stage_evaluated(exp.config, workdir, stage)
  max_new_tokens = max_new_tokens or exp.config.generate.max_new_tokens
  prompts = encode_prompts(exp, texts, max_new_tokens)
  decoded = methods.get(exp.config.method).decode(exp, prompts, stage, checkpoint, budget, sampling, seed,
                                                   max_new_tokens)
  info = {'method': exp.config.method, 'stage': decoded.stage, 'step': decoded.step,
          'checkpoint': decoded.checkpoint}
  return [{'prompt': text, **row, **info} for text, row in zip(texts, decoded.rows)]


def format_row(row: dict) -> str:
  """The table of one decoded prompt: completion, answer, then per position the token, its gate and the latent
  lens's top token (where the gate is >= 0.5) with its probability; '(forced)' marks a token the decoding forced
  (the budget's `<|eot|>`, a forced head)."""
  lines = [row['prompt'], f'  completion  {row["completion"]!r}', f'  answer      {row["answer"]!r}']
  gates = row.get('gates')
  lens = {entry['position']: entry['top'][0] for entry in row.get('latent_lens') or ()}
  lines.append('  position  token' + (' ' * 12 + 'gate    latent lens' if gates is not None else ''))
  for t, token in enumerate(row['tokens']):
    line = f'  {t:8d}  {json.dumps(token, ensure_ascii=False):16s}'
    if gates is not None:
      line += f' {gates[t]:.3f}'
      if t in lens:
        line += f'   {json.dumps(lens[t][0], ensure_ascii=False)} {lens[t][1]:.2f}'
      if t in row.get('forced', ()):
        line += '   (forced)'
    lines.append(line.rstrip())
  return '\n'.join(lines)


def main(argv):
  logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)  # stdout: the completions only
  sampling = None
  if FLAGS.temperature > 0:
    sampling = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  elif FLAGS.temperature < 0:
    sys.exit(f'dtt_jax.generate: --temperature={FLAGS.temperature}: expected 0 (greedy) or > 0 (sampling).')
  try:
    texts = read_prompts(argv[1:], FLAGS.file)
    rows = generate(FLAGS.workdir, texts, FLAGS.stage, FLAGS.checkpoint, FLAGS.budget, FLAGS.max_new_tokens,
                    sampling, FLAGS.seed)
  except (ValueError, FileNotFoundError, CheckpointError) as e:  # bad input: one line, no traceback
    sys.exit(f'dtt_jax.generate: {e}')
  if FLAGS.json:
    for row in rows:
      print(json.dumps(row, ensure_ascii=False))
    return
  first = rows[0]
  how = 'greedy' if sampling is None else f'sampled at temperature {FLAGS.temperature} (seed {FLAGS.seed})'
  budget = '' if FLAGS.budget is None else f', budget {FLAGS.budget}'
  print(f'{FLAGS.workdir}: {first["method"]} {first["stage"]} step {first["step"]} ({first["checkpoint"]}), '
        f'{how}{budget}\n')
  print('\n\n'.join(format_row(row) for row in rows))


if __name__ == '__main__':
  define_flags()
  app.run(main)
