"""Learned thinking tokens (seed 003, issue #10): `config.method = 'think_tokens'`, settings in `config.think`.

The model is a trunk (GPT-2 or Llama family) with K extra vocabulary ids `<think_j>` = vocab_rows + j
(`GPT2Config.extra_tokens`, model/gpt2.py): untied input rows `think_in` [K,D] and output rows `think_out` [K,D] +
`think_bias` [K]; the text rows stay tied. No data contains them; the model may emit them anywhere, and
reinforcement learning decides what they are for.

The package, in the order of a method's parts: `data.py` (records -> texts, teacher batches, rollout prefixes),
`train.py` (the teacher's LM step; the thinking stage's rewards, GRPO loss and step), `decode.py` (rollouts and
the evaluation's interleaved decoding, on the engine's KV-cache step), `evaluate.py` (losses with and without
thinking, thinking statistics, the report); `policy.py` holds `config.think`'s checks and the model and
distributions they share.

Stages (`ThinkTokens.stages`), each under the workdir and resumed from its checkpoints. `config.stage`:
'bootstrap' trains the teacher; 'grpo' trains only the thinking stage, from the teacher a 'bootstrap' run left in
this workdir (or `config.init_from`'s); 'pipeline' both, then the evaluation; 'eval' evaluates the finished
stages.

  teacher/     next-token cross-entropy on each record's text, `question\\n` [steps `\\n`] answer `<|endoftext|>`
               (`think.with_steps`), from `model.init` (scratch or pretrained; `think.teacher_steps=0`: model.init
               as is). Frozen afterwards: it is the reward model of 'teacher' mode and the starting point of the
               policy. `config.init_from` (a workdir with a teacher/ stage) replaces it (then nothing trains).
  think/       GRPO. Policy = teacher + K fresh thinking rows (think_bias set so that the thinking tokens together
               have probability `init_prob` at the median training position; otherwise no rollout would ever sample
               one). A rollout samples from a text prefix (cut at a random position, `think.cut`) with the thinking
               tokens allowed, at most `max_think` in a row (then the next token must be real). Rewards:
                 'teacher'     the continuation runs until `real_tokens` real tokens (or eos); reward = the frozen
                               teacher's mean log-likelihood of those real tokens given the prefix, thinking tokens
                               removed before scoring. The number of real tokens is fixed so that thinking cannot
                               shorten the scored text. No without-thinking baseline is subtracted: GRPO's
                               group-normalised advantage already removes any per-prefix constant.
                 'next_token'  the seed's alternative ("s rollouts for a sequence of length s, each terminating with a
                               single real token prediction"): thinking tokens until the first real token; reward =
                               the policy's log-likelihood of the data's true next token there (over the real
                               tokens). The final action is "emit a real token" with probability P(real) (its
                               identity is replaced by the data's token), and `ce_weight` * that token's
                               cross-entropy is added as a supervised loss.
               Objective: `rl/grpo.py`'s group-normalised advantages, PPO clip and k3 KL (to the initial policy) and
               its loss aggregation, on the rollout's actions (log-probs re-scored in one parallel forward pass).
  eval/<split>/think/  metrics.json, think_histogram.png, samples.jsonl on the texts of `config.eval` (its size,
               else `think.eval_size` of them), with the latest think/ checkpoint: next-token loss without thinking
               (teacher; policy with thinking masked, both teacher-forced) and with thinking (interleaved decoding:
               before each real token the policy may sample thinking tokens, at most `max_think` in a row, which
               stay in the context; the real token is then teacher-forced and scored over the real tokens), the
               same on the answer tokens, thinking-token frequency and the count of each id.

Several processes (launch/multi_process_local.sh): each builds its slice of every batch, computes the evaluation
in full, and process 0 writes the report; the result equals one process's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtt_jax import parallel
from dtt_jax import tokens as tokens_lib
from dtt_jax.eval import heldout
from dtt_jax.methods import base
from dtt_jax.methods.think_tokens import data, decode, evaluate as eval_lib, policy, train as train_lib
from dtt_jax.metrics import MetricWriter
from dtt_jax.sampling.sampler import SamplingConfig
from dtt_jax.train import loop, state as state_lib

log = logging.getLogger(__name__)


class ThinkTokens(base.Method):
  """A teacher LM ('teacher'), then K thinking tokens learned by GRPO ('think'); see the module docstring."""

  stages = ('teacher', 'think')

  def config_sections(self, stage: str) -> tuple[str, ...]:
    del stage
    return ('think',)  # both stages read config.think

  def check_config(self, c) -> None:
    policy.check_config(c)

  def train(self, exp: base.Experiment, stage: str) -> loop.LoopResult:
    cfg = policy.check_config(exp.config)
    train, valid = encode_splits(exp, cfg)
    if stage == 'teacher':
      return train_teacher(exp, train, valid)
    return train_think(exp, cfg, train, valid)

  def evaluate(self, exp: base.Experiment) -> dict[str, float]:
    return evaluate_think(exp)

  def decode(self, exp, prompts, stage, checkpoint='best', budget=None, sampling=None, seed=0,
             max_new_tokens=0) -> base.Decoded:
    return decode_prompts(exp, prompts, stage, checkpoint, budget, sampling, seed, max_new_tokens)


def encode_splits(exp: base.Experiment, cfg: policy.ThinkConfig) -> tuple[data.Texts, data.Texts]:
  """(train texts, validation texts: `think.eval_size` of them, as wide as the train texts); checks that a text
  and a rollout fit `model.n_positions`."""
  c, t = exp.config, exp.config.think
  train = data.encode_texts(exp.train, exp.tokenizer, t.max_len, t.with_steps)
  valid = data.encode_texts(exp.valid[:t.eval_size], exp.tokenizer, train.max_len, t.with_steps)
  need = train.max_len + cfg.rollout_len
  if need > c.model.n_positions:
    raise ValueError(f'Sequences of {train.max_len} tokens (config.think.max_len={t.max_len}) plus rollouts of '
                     f'{cfg.rollout_len} actions (config.think.real_tokens / max_think) need {need} positions, more '
                     f'than config.model.n_positions={c.model.n_positions}: raise it or shorten the others.')
  log.info('think_tokens (%s mode, K=%d): %d train / %d valid texts of <= %d tokens.', cfg.mode, cfg.num_tokens,
           len(train), len(valid), train.max_len)
  return train, valid


# --------------------------------------------------------------------------------------------------------- teacher


def train_teacher(exp: base.Experiment, train: data.Texts, valid: data.Texts) -> loop.LoopResult:
  """The teacher stage in `<workdir>/teacher/` (nothing trains with `config.init_from` or `think.teacher_steps=0`)."""
  c, t = exp.config, exp.config.think
  if c.get('init_from'):
    step, why = base.stage_checkpoint(_init_from(exp), 'teacher', 'latest')
    log.info('teacher: %s/teacher step %d (%s), config.init_from; nothing to train.', c.init_from, step, why)
    return loop.LoopResult(None, step, False, {})
  if t.teacher_steps == 0:
    log.info('teacher: config.model.init=%r as is (config.think.teacher_steps=0).', c.model.init)
    return loop.LoopResult(None, 0, False, {})
  graphdef, params = state_lib.split_model(policy.build_teacher(c, exp.vocab))
  parallel.check_divisible(t.batch_size, exp.mesh, 'think.batch_size')
  tx = state_lib.make_optimizer(t.teacher_lr, t.teacher_steps, t.warmup_steps, t.weight_decay, t.grad_clip)
  state = base.place_state(exp, state_lib.init_state(params, tx, seed=c.seed))
  lm_step = train_lib.make_lm_step(graphdef, tx, exp.mesh)
  batches = data.lm_iterator(train, t.batch_size, seed=c.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
  tok, mask = parallel.replicate((valid.tokens, valid.mask()), exp.mesh)
  scored = max(int(valid.mask()[:, 1:].sum()), 1)

  def validate(state, step, tau):
    del step, tau
    return {'loss': -float(parallel.to_host(jnp.sum(policy.lm_logprobs_jit(graphdef, state.params, tok, mask))))
                    / scored}

  def step_fn(state, batch, tau):
    del tau
    return lm_step(state, parallel.shard_batch(batch, exp.mesh))

  return base.run_stage(exp, 'teacher', state, step_fn, batches, validate, section='think', steps=t.teacher_steps)


def _init_from(exp: base.Experiment) -> base.Experiment:
  return dataclasses.replace(exp, workdir=exp.config.init_from)


def restore_teacher(exp: base.Experiment):
  """-> (graphdef, params laid out on the mesh, trunk config) of the frozen teacher: the latest teacher/
  checkpoint of `config.init_from` or of this workdir, or `model.init` as is with `think.teacher_steps=0`."""
  c = exp.config
  model = policy.build_teacher(c, exp.vocab)
  if c.get('init_from'):
    return (*base.stage_params(_init_from(exp), 'teacher', 'latest', model=model), model.cfg)
  if c.think.teacher_steps == 0:
    graphdef, params = state_lib.split_model(model)
    return graphdef, parallel.shard_state(params, exp.mesh), model.cfg
  _require(exp, 'teacher', 'train the teacher first: --config.stage=bootstrap (or pipeline), or set '
                           'config.init_from to a workdir that has one')
  return (*base.stage_params(exp, 'teacher', 'latest', model=model), model.cfg)


def _require(exp: base.Experiment, stage: str, what_to_do: str) -> None:
  try:
    base.stage_checkpoint(exp, stage, 'latest')
  except FileNotFoundError as e:
    raise FileNotFoundError(f'No {stage} checkpoint in {exp.workdir}/{stage}/checkpoints: {what_to_do}.') from e


# ----------------------------------------------------------------------------------------------------------- think


def initial_policy(exp: base.Experiment, teacher, train: data.Texts):
  """-> (graphdef, host params): the teacher + fresh thinking rows, think_bias calibrated to `think.init_prob` on
  the first training batch (deterministic: the same on resume)."""
  t = exp.config.think
  teacher_graphdef, teacher_params, teacher_cfg = teacher
  rows = np.arange(min(len(train), t.batch_size))
  host = parallel.to_host(teacher_params)  # a full copy on every process (the mesh may span several)
  model = nnx.merge(teacher_graphdef, jax.tree.map(jnp.asarray, host))
  tok, mask = jnp.asarray(train.tokens[rows]), jnp.asarray(train.mask()[rows])
  real_logits = model.logits(policy.forward(model, tok, mask))[..., :teacher_cfg.vocab_rows]
  bias = policy.calibrated_bias(real_logits, mask, t.num_tokens, t.init_prob)
  log.info('think_bias %.3f: thinking probability %.3f at the median training position.', bias, t.init_prob)
  return policy.build_policy(teacher_cfg, host, t.num_tokens, exp.config.seed + 1, bias)


def train_think(exp: base.Experiment, cfg: policy.ThinkConfig, train: data.Texts,
                valid: data.Texts) -> loop.LoopResult:
  """The GRPO stage in `<workdir>/think/`, from the frozen teacher (`restore_teacher`) and the initial policy (also
  the KL reference); validated by the evaluation on `valid`."""
  c, t = exp.config, exp.config.think
  parallel.check_divisible(t.prompts_per_step, exp.mesh, 'think.prompts_per_step')
  teacher = restore_teacher(exp)
  graphdef, start = initial_policy(exp, teacher, train)
  start = jax.device_get(start)  # host copies: the donated state must not share buffers with the reference
  reference = parallel.shard_state(start, exp.mesh)  # laid out as the policy
  tx = train_lib.think_optimizer(t)
  state = base.place_state(exp, state_lib.init_state(start, tx, seed=c.seed + 1))
  step = train_lib.make_think_step(graphdef, teacher[0], tx, cfg, exp.vocab.eos, exp.mesh)
  prefixes = data.prefix_iterator(train, t.prompts_per_step, t.cut, seed=c.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  policy_cfg = dataclasses.replace(teacher[2], extra_tokens=cfg.num_tokens)

  def step_fn(state, batch, tau):
    del tau
    return step(state, reference, teacher[1], parallel.shard_batch(batch, exp.mesh))

  def validate(state, step, tau):
    del step, tau
    return eval_lib.evaluate(teacher[:2], (graphdef, state.params), policy_cfg, valid, cfg.max_think,
                             cfg.temperature, jax.random.key(c.seed + 2), exp.tokenizer, exp.mesh,
                             c.generate.batch_size).metrics

  return base.run_stage(exp, 'think', state, step_fn, prefixes, validate, section='think', steps=t.steps)


# ------------------------------------------------------------------------------------------------------ evaluation


def evaluate_think(exp: base.Experiment) -> dict[str, float]:
  """The latest think/ checkpoint on the texts of `config.eval` (its size, else `think.eval_size` of them); the
  report in `<workdir>/eval/<split or file>/think/` (process 0). Returns its metrics."""
  c, t = exp.config, exp.config.think
  cfg = policy.check_config(c)
  train, _ = encode_splits(exp, cfg)
  name, records = heldout.eval_records(c, exp.valid)
  texts = data.encode_texts(records if c.eval.size else records[:t.eval_size], exp.tokenizer, train.max_len,
                            t.with_steps)
  _require(exp, 'think', 'train the thinking stage first: --config.stage=grpo (after bootstrap) or pipeline')
  teacher = restore_teacher(exp)
  step, why = base.stage_checkpoint(exp, 'think', 'latest')
  model = policy.policy_model(teacher[2], cfg.num_tokens, c.seed + 1)
  graphdef, params = base.stage_params(exp, 'think', str(step), model=model)
  result = eval_lib.evaluate(teacher[:2], (graphdef, params), model.cfg, texts, cfg.max_think, cfg.temperature,
                             jax.random.key(c.seed + 2), exp.tokenizer, exp.mesh, c.generate.batch_size)
  writer = MetricWriter(exp.workdir, c.get('wandb'), c.to_dict())
  writer.write(step, {f'eval/{name}/think/{k}': v for k, v in result.metrics.items()})
  writer.close()
  if jax.process_index() == 0:
    paths = eval_lib.write_report(result, heldout.output_dir(exp.workdir, name, 'think'),
                                  {'mode': cfg.mode, 'K': cfg.num_tokens, 'max_think': cfg.max_think, 'split': name,
                                   'step': step, 'config': heldout.config_hash(c)})
    log.info('think_tokens evaluation of think step %d (%s) on %s (%d texts): %s. Reports: %s', step, why, name,
             len(texts), result.metrics, ', '.join(paths.values()))
  return result.metrics


def decode_prompts(exp: base.Experiment, prompts, stage: str, checkpoint: str = 'best', budget: int | None = None,
                   sampling: SamplingConfig | None = None, seed: int = 0, max_new_tokens: int = 0) -> base.Decoded:
  """`Method.decode`: free decoding after each prompt (`decode.generate` in teacher mode, greedy by default) until
  eos or `max_new_tokens` real tokens (0: `generate.max_new_tokens`). Stage 'think': the policy, at most `budget`
  (None: `think.max_think`) thinking tokens in a row; 'teacher': the teacher, text alone. The answer is the last
  line of the real text."""
  c = exp.config
  cfg = policy.check_config(c)
  teacher = restore_teacher(exp)
  max_think = cfg.max_think if budget is None else budget
  if max_think < 0:
    raise ValueError(f'budget={budget}: expected a number of thinking tokens in a row >= 0.')
  if stage == 'teacher':
    graphdef, params = teacher[:2]
    step, why, max_think = 0, 'the teacher', 0
    if c.think.teacher_steps and not c.get('init_from'):
      step, why = base.stage_checkpoint(exp, 'teacher', 'latest')
  else:
    _require(exp, 'think', 'train the thinking stage first: --config.stage=grpo (after bootstrap) or pipeline')
    step, why = base.stage_checkpoint(exp, 'think', checkpoint)
    graphdef, params = base.stage_params(exp, 'think', str(step),
                                         model=policy.policy_model(teacher[2], cfg.num_tokens, c.seed + 1))
  rollout_cfg = dataclasses.replace(cfg, mode='teacher', real_tokens=max_new_tokens or c.generate.max_new_tokens,
                                    max_think=max_think)
  out = _rollout(graphdef, params, jnp.asarray(prompts.prompt), jnp.asarray(prompts.prompt_mask),
                 jax.random.key(seed), rollout_cfg, exp.vocab.eos, sampling or SamplingConfig(greedy=True))
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask) > 0
  vocab_rows, rows = nnx.merge(graphdef, params).cfg.vocab_rows, []
  for ids in (row[keep] for row, keep in zip(tokens, mask)):
    real = exp.tokenizer.decode(ids[ids < vocab_rows])
    rows.append({'completion': eval_lib.decode_with_thinking(ids, exp.tokenizer, vocab_rows),
                 'answer': real.split(tokens_lib.EOS, 1)[0].rstrip('\n').split('\n')[-1].strip(),
                 'tokens': [eval_lib.decode_with_thinking([i], exp.tokenizer, vocab_rows) for i in ids]})
  return base.Decoded(stage, step, why, rows)


@functools.partial(jax.jit, static_argnames=('graphdef', 'cfg', 'eos_id', 'sampling'))
def _rollout(graphdef, params, prompt, prompt_mask, key, cfg, eos_id, sampling):
  return decode.generate(nnx.merge(graphdef, params), prompt, prompt_mask, key, cfg, eos_id, sampling=sampling)
