"""Learned thinking tokens (`config.method='think_tokens'`, dtt_jax/methods/think_tokens/): the K untied rows of the
model, the two rewards against direct computations, rollout log-probs against re-scoring, the evaluation's
decoding against teacher forcing, exact thinking statistics, and the variant switched on from its config."""

import dataclasses
import importlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dtt_jax.methods.think_tokens import ThinkTokens
from dtt_jax.methods.think_tokens import decode as tt_decode
from dtt_jax.methods.think_tokens import evaluate as tt_eval
from dtt_jax.methods.think_tokens import policy as tt_policy
from dtt_jax.methods.think_tokens import train as tt_train
from dtt_jax.model.gpt2 import GPT2, GPT2Config

from conftest import require_shared

V, K = 128, 3  # vocab_rows (num_tokens 100: rows 100..127 are padding), thinking tokens
CFG = GPT2Config(vocab_rows=V, num_tokens=100, n_positions=64, n_embd=16, n_layer=2, n_head=2)
EOS = 0


def _model(k=0, seed=0, bias=0.0):
  model = GPT2(dataclasses.replace(CFG, extra_tokens=k), rngs=nnx.Rngs(seed))
  if k:
    model.think_bias.value = jnp.full((k,), bias, jnp.float32)
  return model


def _hidden_logits(model, ids):
  ids = jnp.asarray(ids)
  h = tt_policy.forward(model, ids, jnp.ones_like(ids))
  return h, model.logits(h)


def _direct_logprobs(model, seq):
  """log_softmax over the real columns of an unpadded forward of `seq` [T]: [T-1, V] for targets seq[1:]."""
  _, logits = _hidden_logits(model, np.asarray(seq)[None])
  return np.asarray(jax.nn.log_softmax(logits[0, :-1, :V], axis=-1))


# --------------------------------------------------------------------------------------------------------- model


def test_k0_is_the_plain_model_bit_for_bit():
  assert GPT2Config().extra_tokens == 0
  plain, with_rows = _model(0), _model(K)
  assert set(nnx.to_pure_dict(nnx.state(plain))) == {'wte', 'wpe', 'h', 'ln_f'}
  ids = np.random.RandomState(0).randint(0, 100, (2, 9))
  _, logits0 = _hidden_logits(plain, ids)
  _, logits_k = _hidden_logits(with_rows, ids)
  assert logits0.shape == (2, 9, V) and logits_k.shape == (2, 9, V + K)
  np.testing.assert_array_equal(np.asarray(logits0), np.asarray(logits_k[..., :V]))  # same text rows, same numbers
  assert (np.asarray(logits0[..., 100:]) < -1e8).all()  # padding rows still masked


def test_thinking_rows_are_untied_and_text_rows_stay_tied():
  model = _model(K, bias=0.5)
  ids = jnp.asarray([[5, 7, V + 1, 9]])  # <think_1> at position 2
  emb = model.embed(ids)
  np.testing.assert_array_equal(np.asarray(emb[0, 2]), np.asarray(model.think_in[1]))
  np.testing.assert_array_equal(np.asarray(emb[0, 1]), np.asarray(model.wte.embedding[7]))
  h, logits = _hidden_logits(model, ids)
  np.testing.assert_allclose(np.asarray(logits[..., :100]), np.asarray(h @ model.wte.embedding[...].T)[..., :100],
                             rtol=1e-5, atol=1e-5)  # the tied text rows
  np.testing.assert_allclose(np.asarray(logits[..., V:]), np.asarray(h @ model.think_out[...].T + 0.5), rtol=1e-5,
                             atol=1e-5)

  graphdef, params = nnx.split(model)

  def loss(params, ids):  # log-likelihood of <think_2> after each position: a pure output-side loss
    m = nnx.merge(graphdef, params)
    return jnp.sum(jax.nn.log_softmax(_hidden_logits(m, ids)[1])[..., V + 2])

  text_only = jax.grad(loss)(params, jnp.asarray([[5, 7, 8, 9]]))
  assert np.abs(np.asarray(text_only['think_out'].value)).sum() > 0
  assert np.abs(np.asarray(text_only['think_bias'].value)).sum() > 0
  np.testing.assert_array_equal(np.asarray(text_only['think_in'].value), 0.0)  # never fed: no gradient
  fed = np.asarray(jax.grad(loss)(params, ids)['think_in'].value)
  assert np.abs(fed[1]).sum() > 0 and not fed[0].any() and not fed[2].any()  # only the fed row


# ------------------------------------------------------------------------------------------------------- rewards


def test_teacher_reward_scores_only_the_real_tokens():
  teacher = _model(0, seed=1)
  prefix = np.array([[EOS, EOS, 11, 12], [21, 22, 23, 24]], np.int32)  # left-padded
  prefix_mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int32)
  actions = np.array([[V + 0, 31, V + 2, 32, 33, EOS], [41, 42, V + 1, V + 1, 43, 44]], np.int32)
  action_mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]], np.int32)  # last slot after the end
  reward = np.asarray(tt_train.teacher_reward(teacher, jnp.asarray(prefix), jnp.asarray(prefix_mask),
                                        jnp.asarray(actions), jnp.asarray(action_mask)))
  for row, (real_prefix, real) in enumerate((([11, 12], [31, 32, 33]), ([21, 22, 23, 24], [41, 42, 43]))):
    lp = _direct_logprobs(teacher, real_prefix + real)
    n = len(real_prefix)
    want = np.mean([lp[n - 1 + j, tok] for j, tok in enumerate(real)])
    np.testing.assert_allclose(reward[row], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', ['teacher', 'next_token'])
def test_rollouts_rescore_and_next_token_reward(mode):
  policy = _model(K, seed=2, bias=4.0)  # thinking likely: rollouts hold thinking runs
  cfg = tt_policy.ThinkConfig(num_tokens=K, mode=mode, real_tokens=3, max_think=2, num_generations=2)
  prefix = jnp.asarray(np.array([[EOS, 11, 12], [21, 22, 23]] * 4, np.int32))
  prefix_mask = jnp.asarray(np.array([[0, 1, 1], [1, 1, 1]] * 4, np.int32))
  targets = jnp.asarray(np.array([51, 52] * 4, np.int32))
  roll = tt_decode.generate(policy, prefix, prefix_mask, jax.random.key(0), cfg, EOS, targets)
  tokens, mask = np.asarray(roll.tokens), np.asarray(roll.mask)
  assert tokens.shape == (8, cfg.rollout_len)
  assert (tokens[mask > 0] >= V).any()
  for row in range(8):
    acts = tokens[row][mask[row] > 0]
    run = 0
    for a in acts:  # never more than max_think thinking tokens in a row
      run = run + 1 if a >= V else 0
      assert run <= cfg.max_think
    real = acts[acts < V]
    assert len(real) == (cfg.real_tokens if mode == 'teacher' else 1) or EOS in real
    if mode == 'next_token':  # thoughts, then the data's token; reward = its log-prob after the thoughts
      assert acts[-1] == targets[row] and (acts[:-1] >= V).all()
      context = list(np.asarray(prefix[row])[np.asarray(prefix_mask[row]) > 0]) + list(acts[:-1])
      _, logits = _hidden_logits(policy, np.asarray(context)[None])
      want = jax.nn.log_softmax(logits[0, -1, :V])[targets[row]]
      np.testing.assert_allclose(np.asarray(roll.target_logprob)[row], want, rtol=1e-5, atol=1e-5)
  # the rollout's action log-probs are what one parallel re-scoring pass gives
  logits = tt_train.rollout_logits(policy, prefix, prefix_mask, roll.tokens)
  rescored = tt_policy.action_logprobs(logits, roll.tokens, roll.allowed > 0, V, cfg.temperature, mode == 'next_token')
  np.testing.assert_allclose(np.asarray(rescored) * mask, np.asarray(roll.logprobs), rtol=1e-4, atol=1e-4)


def test_next_token_stop_action_is_the_real_mass():
  logits = jnp.asarray([[1.0, 2.0, 0.5, 3.0, -1.0]])  # vocab_rows 3, K 2
  allowed = jnp.asarray([True])
  p = np.exp(np.array([1.0, 2.0, 0.5, 3.0, -1.0]))
  p /= p.sum()
  stop = tt_policy.action_logprobs(logits, jnp.asarray([1]), allowed, 3, 1.0, stop_action=True)
  think = tt_policy.action_logprobs(logits, jnp.asarray([3]), allowed, 3, 1.0, stop_action=True)
  np.testing.assert_allclose(np.asarray(stop), np.log(p[:3].sum()), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(think), np.log(p[3]), rtol=1e-6)
  banned = tt_policy.action_logprobs(logits, jnp.asarray([1]), jnp.asarray([False]), 3, 1.0, stop_action=False)
  np.testing.assert_allclose(np.asarray(banned), np.log(p[1] / p[:3].sum()), rtol=1e-6)  # thinking masked


# ---------------------------------------------------------------------------------------------------- evaluation


def test_think_stats_exact():
  tokens = np.array([[5, V + 0, V + 2, 7, V + 2], [V + 1, 9, V + 2, 0, 0]])
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # the last row's V + 2 counts, padding does not
  frequency, counts = tt_eval.think_stats(tokens, mask, V, K)
  assert frequency == 5 / 8
  np.testing.assert_array_equal(counts, [1, 1, 3])
  frequency, counts = tt_eval.think_stats(tokens, np.zeros_like(mask), V, K)
  assert frequency == 0.0 and counts.tolist() == [0, 0, 0]


def test_interleaved_decoding_without_thinking_is_teacher_forcing():
  policy = _model(K, seed=3, bias=2.0)
  tokens = np.array([[11, 12, 13, 14, 15, 0], [21, 22, 23, 0, 0, 0]], np.int32)
  lengths = np.array([6, 4])
  mask = (np.arange(6)[None] < lengths[:, None]).astype(np.int32)
  forced = np.asarray(tt_policy.lm_logprobs(policy, jnp.asarray(tokens), jnp.asarray(mask)))
  out = tt_decode.interleaved_decode(policy, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0), 0, 1.0, 6,
                                    EOS)
  np.testing.assert_allclose(np.asarray(out.target_logprob), forced, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.fed)[0], tokens[0])
  # with thinking: the real tokens keep their order, runs of thoughts are at most max_think long
  out = tt_decode.interleaved_decode(policy, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0), 2, 1.0,
                                    tt_decode.eval_capacity(6, 2, 64), EOS)
  fed, fed_mask = np.asarray(out.fed), np.asarray(out.fed_mask)
  for row in range(2):
    seq = fed[row][fed_mask[row] > 0]
    np.testing.assert_array_equal(seq[seq < V], tokens[row, :lengths[row]])
  assert (fed[fed_mask > 0] >= V).any()
  scored = (np.arange(6)[None] >= 1) & (np.arange(6)[None] < lengths[:, None])
  assert (np.asarray(out.target_logprob)[scored] < 0).all() and not np.asarray(out.target_logprob)[~scored].any()


def test_rows_only_optimizer_freezes_the_teacher_weights():
  t = ml_collections.ConfigDict(dict(steps=10, mu=1, warmup_steps=1, weight_decay=0.0, lr=1e-2, rows_lr_mult=1.0,
                                     train='rows', grad_clip=1.0))
  params = {'wte': jnp.ones((4, 2)), 'think_in': jnp.ones((2, 2)), 'think_out': jnp.ones((2, 2)),
            'think_bias': jnp.zeros((2,))}
  tx = tt_train.think_optimizer(t)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  np.testing.assert_array_equal(np.asarray(params['wte']), 1.0)
  assert (np.asarray(params['think_in']) < 1.0).all() and (np.asarray(params['think_bias']) < 0).all()


# ------------------------------------------------------------------------------------------------------- configs


def test_bad_think_values_are_named():
  config = importlib.import_module('configs.think_tokens').get_config()
  config.think.mode = 'x'
  with pytest.raises(ValueError, match=r"config.think.mode='x': expected one of 'teacher', 'next_token'"):
    ThinkTokens().check_config(config)
  config.think.mode, config.think.init_prob = 'teacher', 1.0
  with pytest.raises(ValueError, match=r'config.think.init_prob=1.0 must be in \(0, 1\)'):
    ThinkTokens().check_config(config)


def _tiny(config, mode):
  config.think.mode = mode
  config.dataset.train_size, config.dataset.valid_size = 64, 8
  t = config.think
  t.teacher_steps, t.steps, t.batch_size, t.prompts_per_step, t.num_generations = 3, 2, 8, 2, 2
  t.eval_size, t.eval_every, t.checkpoint_every, t.log_every = 8, 0, 100, 1
  t.real_tokens, t.max_think, t.num_tokens = 2, 2, 4
  config.num_devices = 1
  return config


@pytest.mark.parametrize('mode', ['next_token'])  # 'teacher' (the default): tests/test_multiprocess.py
def test_config_switch_runs_end_to_end(mode, tmp_path):
  require_shared('gpt2_tokenizer')
  from dtt_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = importlib.import_module('configs.think_tokens').get_config()
  assert config.method == 'think_tokens' and config.think.mode == 'teacher'
  pipeline.run(_tiny(config, mode), str(tmp_path))
  out = tmp_path / 'eval' / 'valid' / 'think'
  metrics = json.loads((out / 'metrics.json').read_text())
  assert metrics['mode'] == mode and metrics['K'] == 4 and len(metrics['think_counts']) == 4
  assert metrics['num_sequences'] == 8 and 0.0 <= metrics['think_frequency'] < 1.0
  assert sum(metrics['think_counts']) == round(metrics['think_per_token'] * metrics['num_scored_tokens'])
  for key in ('loss_teacher', 'loss_no_think', 'loss_think', 'answer_loss_think'):
    assert metrics[key] > 0
  assert (out / 'think_histogram.png').stat().st_size > 0 and (out / 'samples.jsonl').read_text()
  assert (tmp_path / 'teacher' / 'checkpoints').is_dir() and (tmp_path / 'think' / 'checkpoints').is_dir()
  _generate_matches_a_full_recompute(tmp_path, max_think=2, real_tokens=3)


def _generate_matches_a_full_recompute(workdir, max_think: int, real_tokens: int):
  """`python -m dtt_jax.generate` on a think_tokens run: greedy decoding after each question (the KV-cache rollout)
  equals a loop that reruns the policy on the whole sequence, a thinking token allowed while fewer than max_think
  came in a row, until eos or `real_tokens` real tokens; with budget 0 no thinking token appears."""
  from dtt_jax import generate, pipeline  # pylint: disable=g-import-not-at-top
  from dtt_jax.methods import base  # pylint: disable=g-import-not-at-top
  exp = pipeline.open_workdir(str(workdir))
  questions = [r['question'] for r in exp.valid[:4]]
  rows = generate.generate(str(workdir), questions, max_new_tokens=real_tokens)
  teacher_cfg = tt_policy.build_teacher(exp.config, exp.vocab).cfg
  graphdef, params = base.stage_params(exp, 'think', 'latest', model=tt_policy.policy_model(
      teacher_cfg, exp.config.think.num_tokens, exp.config.seed + 1))
  model = nnx.merge(graphdef, params)
  vr, width = model.cfg.vocab_rows, 32  # sequences right-padded to one width: one compilation

  @jax.jit
  def next_logits(ids, length):  # ids [width] -> logits [V+K] after its first `length` tokens
    mask = (jnp.arange(width) < length).astype(jnp.int32)[None]
    return model.logits(tt_policy.forward(model, ids[None], mask))[0, length - 1]

  for question, row in zip(questions, rows):
    seq, run, real, want = exp.tokenizer.encode(question.strip() + '\n').tolist(), 0, 0, []
    while real < real_tokens and len(want) < real_tokens * (max_think + 1):
      logits = next_logits(jnp.asarray(seq + [0] * (width - len(seq)), jnp.int32), len(seq))
      token = int(jnp.argmax(tt_policy.mask_thinking(logits, jnp.asarray(run < max_think), vr)))
      want.append(token)
      seq.append(token)
      run, real = (run + 1, real) if token >= vr else (0, real + 1)
      if token == exp.vocab.eos:
        break
    assert row['tokens'] == [tt_eval.decode_with_thinking([t], exp.tokenizer, vr) for t in want], question
    assert (row['method'], row['stage']) == ('think_tokens', 'think')
  for row in generate.generate(str(workdir), questions, budget=0, max_new_tokens=real_tokens):
    assert '<think_' not in row['completion'] and len(row['tokens']) <= real_tokens


def test_think_stage_without_a_teacher_says_which_stage_to_run(tmp_path):
  require_shared('gpt2_tokenizer')
  from dtt_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = _tiny(importlib.import_module('configs.think_tokens').get_config(), 'teacher')
  config.stage = 'grpo'  # the think stage only
  with pytest.raises(FileNotFoundError, match=r'No teacher checkpoint in .*--config.stage=bootstrap'):
    pipeline.run(config, str(tmp_path))
