"""The composite reward (SPEC §8): exact values on hand-written completions, the vectorised function equal to a
plain per-token reference on 40,000 fuzzed completions, bounds, and no exception on any input."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtt_jax import tokens
from dtt_jax.data.answers import DATASETS, check_answer, extract_answer
from dtt_jax.reward import COMPONENTS, compute_rewards, decode_completions, span_masks
from dtt_jax.reward.reward import CLIP

B, E, S = tokens.BOT_ID, tokens.EOT_ID, tokens.EOS_ID  # GPT-2 ids = model ids of the full vocabulary
BOT, EOT, EOS = tokens.BOT, tokens.EOT, tokens.EOS
FULL = tokens.Vocab.full()
PAD_GATE = 0.7  # gate under mask 0: must be ignored


def make_batch(rows, vocab=FULL):
  """rows: (gpt2 ids, gates, mask or None) -> tokens, mask, gates [N,T] (model ids), padded with masked eos."""
  t = max(len(ids) for ids, _, _ in rows)
  toks = np.full((len(rows), t), vocab.eos, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  gates = np.full((len(rows), t), PAD_GATE)
  for i, (ids, g, m) in enumerate(rows):
    toks[i, :len(ids)] = vocab.to_model(ids)
    mask[i, :len(ids)] = 1 if m is None else m
    gates[i, :len(ids)] = g
  return toks, mask, gates


# Each case: (gpt2 ids, gates, mask, completion text, reference, expected components, reasoning length).
# Expected values are worked out by hand in the comments (structure, correctness, efficiency, gate).
CASES = {
    'well_formed_correct': (  # inner 11,12,13: mean 0.8; outer bot,eot,14,eos: (0.1+0.2+0+0.3)/4 = 0.15
        [B, 11, 12, 13, E, 14, S], [0.1, 0.9, 0.8, 0.7, 0.2, 0.0, 0.3], None, f'{BOT}abc{EOT} 42{EOS}', '42',
        dict(structure=0.2, correctness=1.0, efficiency=-0.03, gate=0.5 * 0.8 - 0.2 * 0.15), 3),
    'empty_span_wrong_answer': (  # no inner positions: inner mean 0; outer mean 0.5 -> gate -0.1
        [B, E, 14, S], [0.5] * 4, None, f'{BOT}{EOT} 41{EOS}', '42',
        dict(structure=0.2, correctness=-0.5, efficiency=0.0, gate=-0.1), 0),
    'no_eot_span_runs_to_end': (  # inner 11,12,eos (span never closed): mean 1; outer bot: 0
        [B, 11, 12, S], [0.0, 1.0, 1.0, 1.0], None, f'{BOT}ab{EOS}', '42',
        dict(structure=-1.0, correctness=-0.5, efficiency=-0.03, gate=0.5), 3),
    'two_bots': (  # span from the first bot: inner 11,bot,12 mean 0.6; outer 0.2 -> 0.3 - 0.04
        [B, 11, B, 12, E, 14, S], [0.2, 0.6, 0.6, 0.6, 0.2, 0.2, 0.2], None, f'{BOT}a{BOT}b{EOT} 42{EOS}', '42',
        dict(structure=-1.0, correctness=1.0, efficiency=-0.03, gate=0.26), 3),
    'eot_before_bot': (  # eot before bot does not close; inner 11,eos mean 0; outer eot,bot mean 1; answer '42<|bot|>a'
        [E, B, 11, S], [1.0, 1.0, 0.0, 0.0], None, f'{EOT} 42{BOT}a{EOS}', '42',
        dict(structure=-1.0, correctness=1.0, efficiency=-0.02, gate=-0.2), 2),
    'whitespace_answer': (  # the answer is empty after stripping
        [B, 11, E, 220, S], [0.0] * 5, None, f'{BOT}a{EOT} {EOS}', '42',
        dict(structure=-1.0, correctness=-0.5, efficiency=-0.01, gate=0.0), 1),
    'empty_completion': (  # nothing is real: both gate sets empty
        [S, S], [0.9, 0.9], [0, 0], '', '42',
        dict(structure=-1.0, correctness=-0.5, efficiency=0.0, gate=0.0), 0),
    'masked_specials_and_nan_gate': (  # bot/eot under mask 0 ignored; NaN gate is 0: inner {0}; outer (0+1+1+1)/4
        [B, 11, E, 14, S, B, E], [0.0, math.nan, 1.0, 1.0, 1.0, 1.0, 1.0], [1, 1, 1, 1, 1, 0, 0],
        f'{BOT}a{EOT} 42{EOS}', '42', dict(structure=0.2, correctness=1.0, efficiency=-0.01, gate=-0.15), 1),
}


def run_cases(vocab=FULL, weights=None):
  rows = [(ids, g, m) for ids, g, m, *_ in CASES.values()]
  toks, mask, gates = make_batch(rows, vocab)
  texts = [c[3] for c in CASES.values()]
  refs = [c[4] for c in CASES.values()]
  return compute_rewards(toks, mask, gates, texts, refs, 'gsm8k', vocab, weights)


def test_hand_written_cases_exact_values():
  out = run_cases()
  for i, (name, case) in enumerate(CASES.items()):
    expected, length = case[5], case[6]
    for component in COMPONENTS:
      np.testing.assert_allclose(out[component][i], expected[component], atol=1e-6, err_msg=f'{name} {component}')
    np.testing.assert_allclose(out['total'][i], sum(expected.values()), atol=1e-6, err_msg=name)
    assert out['reasoning_length'][i] == length, name
    assert out['structure_ok'][i] == (expected['structure'] > 0), name
    assert out['correct'][i] == (expected['correctness'] > 0), name


def test_diagnostics_of_a_well_formed_completion():
  out = run_cases()
  assert out['completion_length'][0] == 7 and out['outer_length'][0] == 4
  assert out['num_bot'][0] == 1 and out['num_eot'][0] == 1 and out['has_answer'][0]
  np.testing.assert_allclose([out['inner_gate_mean'][0], out['outer_gate_mean'][0]], [0.8, 0.15], atol=1e-6)
  assert out['num_bot'][3] == 2  # two_bots
  assert out['completion_length'][6] == 0 and out['inner_gate_mean'][6] == 0 == out['outer_gate_mean'][6]
  assert out['num_bot'][7] == 1 and out['num_eot'][7] == 1  # masked specials are not counted


def test_weights_scale_components_and_unknown_weight_raises():
  """total = sum of weight * component; weights left out are 1.0."""
  out = run_cases(weights={'structure': 2.0, 'correctness': 0.5, 'efficiency': 0.0})
  np.testing.assert_allclose(out['total'][0], 2 * 0.2 + 0.5 * 1.0 + 0.0 + 0.37, atol=1e-6)
  np.testing.assert_allclose(out['structure'][0], 0.2, atol=1e-7)  # components are reported unweighted
  with pytest.raises(ValueError, match='structure, correctness, efficiency, gate'):
    run_cases(weights={'format': 1.0})


def test_efficiency_is_clipped_at_minus_1_5():
  ids = [B] + [11] * 200 + [E, 14, S]
  toks, mask, gates = make_batch([(ids, [0.0] * len(ids), None)])
  out = compute_rewards(toks, mask, gates, [f'{BOT}{"a" * 200}{EOT} 42{EOS}'], ['42'], 'gsm8k', FULL)
  assert out['reasoning_length'][0] == 200  # raw efficiency -2.0
  np.testing.assert_allclose(out['efficiency'][0], -CLIP)
  np.testing.assert_allclose(out['total'][0], 0.2 + 1.0 - 1.5 + 0.0, atol=1e-6)


def test_compact_vocab_ids_are_used():
  """The same completions in compact model ids give the same rewards; read with the full vocab's ids, the
  compact tokens have no <|bot|>/<|eot|> at all, so every structure fails."""
  compact = tokens.Vocab.compact([ids for ids, *_ in CASES.values()])
  assert compact.bot != B
  full, small = run_cases(FULL), run_cases(compact)
  for key in full:
    np.testing.assert_array_equal(full[key], small[key], err_msg=key)
  rows = [(ids, g, m) for ids, g, m, *_ in CASES.values()]
  toks, mask, gates = make_batch(rows, compact)
  wrong = compute_rewards(toks, mask, gates, [c[3] for c in CASES.values()], [c[4] for c in CASES.values()],
                          'gsm8k', FULL)
  assert not wrong['structure_ok'].any() and (wrong['reasoning_length'] == 0).all()


def test_bad_arguments_raise():
  toks, mask, gates = make_batch([([B, E, S], [0.0] * 3, None)])
  with pytest.raises(ValueError, match='known'):
    compute_rewards(toks[:0], mask[:0], gates[:0], [], [], 'mathqa', FULL)  # even for an empty batch
  with pytest.raises(ValueError, match='shape'):
    compute_rewards(toks, mask[:, :2], gates, ['x'], ['1'], 'gsm8k', FULL)
  with pytest.raises(ValueError, match='completions'):
    compute_rewards(toks, mask, gates, [], ['1'], 'gsm8k', FULL)


def test_empty_batch():
  out = compute_rewards(np.zeros((0, 5), int), np.zeros((0, 5)), np.zeros((0, 5)), [], [], 'addition', FULL)
  assert all(v.shape == (0,) for v in out.values())


def test_decoded_completions_end_to_end(hf_tokenizer):
  """Completions encoded with the real tokenizer (full and compact vocab), decoded by decode_completions, get the
  rewards of their structure and answer."""
  texts = [f'{BOT}1+2 is 3{EOT} 3{EOS}', f'{BOT}1+2{EOT} 4{EOS}', f'1+2 is 3{EOT} 3{EOS}']
  gpt2_ids = [hf_tokenizer.encode(t) for t in texts]
  for vocab in (FULL, tokens.Vocab.compact(gpt2_ids)):
    tokenizer = tokens.Tokenizer(hf_tokenizer, vocab)
    rows = [(ids, [0.5] * len(ids), None) for ids in gpt2_ids]
    toks, mask, gates = make_batch(rows, vocab)
    completions = decode_completions(tokenizer, toks, mask)
    assert completions == texts
    out = compute_rewards(toks, mask, gates, completions, ['3'] * 3, 'addition', vocab)
    np.testing.assert_array_equal(out['structure_ok'], [True, True, False])
    np.testing.assert_array_equal(out['correct'], [True, False, True])
    np.testing.assert_array_equal(out['reasoning_length'], [len(gpt2_ids[0]) - 4, len(gpt2_ids[1]) - 4, 0])


# --- reference implementation and fuzzing ---------------------------------------------------------------------


def reference_rewards(ids, mask, gates, text, reference, dataset, bot, eot, weights):
  """One completion, token by token, with the engine's phase machine (0 before bot, 1 in the span, 2 after)."""
  phase, inner, outer = 0, [], []
  real = [(t, g) for t, m, g in zip(ids, mask, gates) if m > 0]
  for t, g in real:
    g = min(max(g, 0.0), 1.0) if math.isfinite(g) else 0.0
    (inner if phase == 1 and t != eot else outer).append(g)
    if phase == 0 and t == bot:
      phase = 1
    elif phase == 1 and t == eot:
      phase = 2
  answer = extract_answer(text)
  num_bot = sum(t == bot for t, _ in real)
  num_eot = sum(t == eot for t, _ in real)
  mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
  clip = lambda x: min(max(x, -CLIP), CLIP)
  comps = dict(
      structure=0.2 if num_bot == 1 and num_eot == 1 and phase == 2 and answer else -1.0,
      correctness=1.0 if check_answer(dataset, answer, reference) else -0.5,
      efficiency=clip(-0.01 * len(inner)),
      gate=clip(0.5 * mean(inner) - 0.2 * mean(outer)))
  comps['total'] = sum(weights.get(k, 1.0) * comps[k] for k in COMPONENTS)
  comps['reasoning_length'] = len(inner)
  return comps


def assert_matches_reference(out, toks, mask, gates, texts, refs, dataset, vocab, weights):
  """Every row of compute_rewards' output equals reference_rewards of that row."""
  rows = zip(toks.tolist(), mask.tolist(), gates.tolist(), texts, refs)
  want = [reference_rewards(*row, dataset, vocab.bot, vocab.eot, weights) for row in rows]
  for key in want[0] if want else ():
    expected = np.array([w[key] for w in want])
    bad = np.flatnonzero(~np.isclose(out[key], expected, atol=1e-5, rtol=0))
    assert not bad.size, f'{key} differs in rows {bad[:10]}: {out[key][bad[:3]]} vs {expected[bad[:3]]}'


PIECES = [BOT, EOT, EOS, ' ', '42', '-7', '1,000', '$', '.', '1e400', '9' * 500, 'nan', 'inf', 'True', 'false',
          'Tom is a wumpus.', '日本', '🙂', '\x00', '\u2212', '####', 'The answer is']


def random_text(rng, max_pieces=8):
  return ''.join(rng.choice(PIECES) for _ in range(rng.integers(0, max_pieces + 1)))


def fuzz_batch(rng, n, t, vocab, dataset):
  """n adversarial completions: random ids heavy in specials, a third well formed; prefix, random and full masks;
  gates in [0, 1] with some NaN/inf/out-of-range; texts consistent with well-formed rows or random garbage."""
  special = np.array([vocab.bot, vocab.eot, vocab.eos, vocab.latent, vocab.pause])
  toks = np.where(rng.random((n, t)) < 0.3, rng.choice(special, (n, t)), rng.integers(0, vocab.num_tokens, (n, t)))
  refs = {'gsm8k': ['42', '1,000', '-7', '0.5'], 'prosqa': ['Tom is a wumpus.'], 'prontoqa': ['True', 'False'],
          'addition': ['42', '1234'], 'prosqa_mini': ['Tom is a wumpus.']}[dataset]
  references = [str(rng.choice(refs)) for _ in range(n)]
  texts = []
  for i in range(n):
    if rng.random() < 0.35:  # well formed: <|bot|> k tokens <|eot|> answer tokens <|endoftext|>
      k = rng.integers(0, t - 4)
      toks[i, 0], toks[i, 1:k + 1], toks[i, k + 1] = vocab.bot, rng.integers(5, 100, k), vocab.eot
      toks[i, k + 2:k + 4], toks[i, k + 4:] = rng.integers(5, 100, 2), vocab.eos
      answer = references[i] if rng.random() < 0.5 else random_text(rng, 2)
      texts.append(f'{BOT}{"x" * k}{EOT} {answer}{EOS}')
    else:
      texts.append(random_text(rng))
  kind = rng.integers(0, 3, n)[:, None]
  lengths = rng.integers(0, t + 1, n)[:, None]
  mask = np.where(kind == 0, np.arange(t)[None] < lengths, np.where(kind == 1, rng.random((n, t)) < 0.8, True))
  gates = rng.random((n, t))
  odd = rng.random((n, t))
  gates = np.where(odd < 0.02, np.nan, np.where(odd < 0.03, np.inf, np.where(odd < 0.04, -np.inf, gates)))
  gates = np.where((odd > 0.04) & (odd < 0.05), rng.normal(0, 3, (n, t)), gates)
  return toks, mask.astype(np.int32), gates, texts, references


@pytest.mark.parametrize('dataset', DATASETS)
def test_fuzzed_batch_matches_reference_and_stays_in_bounds(dataset):
  """10,000 fuzzed completions per dataset: no exception, finite, every component in [-1.5, 1.5] and on its
  allowed values, and every output equal to the token-by-token reference."""
  rng = np.random.default_rng(DATASETS.index(dataset))
  vocab = tokens.Vocab.compact([range(0, 50261, 7)]) if dataset == 'prosqa' else FULL
  weights = {'structure': 2.0, 'gate': 0.5} if dataset == 'gsm8k' else {}
  toks, mask, gates, texts, refs = fuzz_batch(rng, 10_000, 24, vocab, dataset)
  out = compute_rewards(toks, mask, gates, texts, refs, dataset, vocab, weights)
  for component in COMPONENTS:
    assert np.isfinite(out[component]).all() and (np.abs(out[component]) <= CLIP).all(), component
  assert np.isin(out['structure'], np.float32([0.2, -1.0])).all()
  assert np.isin(out['correctness'], np.float32([1.0, -0.5])).all()
  assert out['structure_ok'].mean() > 0.1 and out['correct'].mean() > 0.05  # the fuzzer reaches the good paths
  assert out['structure_ok'].mean() < 0.5 and (out['reasoning_length'] > 0).mean() > 0.3
  assert_matches_reference(out, toks, mask, gates, texts, refs, dataset, vocab, weights)


SMALL_IDS = st.sampled_from([B, E, S, tokens.LATENT_ID, 11, 12])


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(SMALL_IDS, max_size=10), st.lists(st.booleans(), min_size=10, max_size=10),
                               st.lists(st.floats(), min_size=10, max_size=10),
                               st.lists(st.sampled_from(PIECES) | st.text(max_size=6), max_size=6).map(''.join),
                               st.text(max_size=8)), min_size=1, max_size=4),
       dataset=st.sampled_from(DATASETS))
def test_hypothesis_small_batches_match_reference(rows, dataset):
  """Any small batch (any floats as gates, any text as answer and reference) matches the reference, in bounds."""
  t = max(1, max(len(ids) for ids, *_ in rows))
  toks = np.full((len(rows), t), S)
  mask = np.zeros((len(rows), t), np.int32)
  gates = np.zeros((len(rows), t))
  for i, (ids, m, g, _, _) in enumerate(rows):
    toks[i, :len(ids)], mask[i, :len(ids)], gates[i, :len(ids)] = ids, m[:len(ids)], g[:len(ids)]
  texts, refs = [r[3] for r in rows], [r[4] for r in rows]
  out = compute_rewards(toks, mask, gates, texts, refs, dataset, FULL)
  assert_matches_reference(out, toks, mask, gates, texts, refs, dataset, FULL, {})
  assert all((np.abs(out[c]) <= CLIP).all() for c in COMPONENTS)


def test_span_masks_partition_the_real_positions():
  """inner and outer are disjoint and together exactly the real positions."""
  rng = np.random.default_rng(7)
  toks, mask, *_ = fuzz_batch(rng, 2000, 16, FULL, 'addition')
  inner, outer, _ = span_masks(toks, mask, FULL)
  assert not (inner & outer).any()
  np.testing.assert_array_equal(inner | outer, mask > 0)
