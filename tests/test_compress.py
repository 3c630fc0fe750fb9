"""The compressing DTT (issue #28): the curriculum's layouts (which positions hold latents, which have targets, where
the gate hinge acts), the final layout each method is scored in, the group-normalised length reward, and the
forced budgets of the evaluation."""

import numpy as np
import pytest

from configs import coconut as coconut_configs
from dtt_jax import tokens
from dtt_jax.data import coconut
from dtt_jax.reward import compute_rewards, group_length_reward

RECORD = {'question': '53 + 56 =', 'steps': ['3+6=9 write 9', '5+5=10 write 0 carry 1', 'carry 1 write 1'],
          'answer': '109'}


@pytest.fixture(scope='module')
def tok(hf_tokenizer):
  return tokens.Tokenizer(hf_tokenizer, tokens.Vocab.full())


def _ids(tok, *texts):
  return [int(i) for t in texts for i in tok.encode(t)]


@pytest.mark.parametrize('stage', [0, 1, 2, 3, 4])
@pytest.mark.parametrize('ratio,targets', [(0, False), (0, True), (4, True)])
def test_curriculum_layouts_per_stage(tok, stage, ratio, targets):
  """Stage k <= K replaces the first k steps by latents: COCONUT's k c (r = 0; K c past stage K, even for a record
  with fewer steps), or ceil(m / r) for each replaced step of m tokens; stage K + 1 every step. The completion is
  `<|bot|> latents steps[k:] <|eot|> answer <|endoftext|>`; every other token is a target, the latents only when
  the model emits them itself (`latent_targets`; else decoding forces them); the inner positions (gate hinge,
  pinned gates at the latents) strictly between <|bot|> and <|eot|>; no filler."""
  cfg = coconut.Curriculum(c_thoughts=1, max_stage=3, tokens_per_latent=ratio, latent_targets=targets)
  v = tok.vocab
  steps = [s + '\n' for s in RECORD['steps']]
  lengths = [len(tok.encode(s)) for s in steps]  # 8, 10, 5
  replaced = lengths[:stage] if stage <= 3 else lengths
  latents = sum(-(-m // ratio) for m in replaced) if ratio else min(stage, 3)
  kept = steps[stage:] if stage <= 3 else []
  expected = [v.bot] + [v.latent] * latents + _ids(tok, *kept) + [v.eot] + _ids(tok, '109') + [v.eos]
  sample = coconut.build_sample(RECORD, 'dtt', stage, cfg, tok)
  assert sample.completion.tolist() == expected
  latent_mask = [0] + [1] * latents + [0] * (len(expected) - 1 - latents)
  assert sample.latent_mask.tolist() == latent_mask
  assert sample.loss_mask.tolist() == [1 - (m and not targets) for m in latent_mask]
  batch = coconut.stage1_batch(coconut.build_batch([RECORD], 'dtt', stage, cfg, tok, 16, 40), v)
  n = len(expected)
  span = n - 4 - len(_ids(tok, '109')) + 1  # latents + kept step tokens
  assert batch.inner_mask[0].tolist() == [0] + [1] * span + [0] * (40 - 1 - span)
  assert batch.completion_mask[0].tolist() == [1] * n + [0] * (40 - n)
  assert batch.loss_mask[0].tolist() == sample.loss_mask.tolist() + [0] * (40 - n)
  assert (batch.outer_mask[0] + batch.inner_mask[0]).tolist() == batch.completion_mask[0].tolist()
  assert not batch.filler_mask.any()
  if ratio == 4 and stage >= 1:  # 8 tokens -> 2 latents, 10 -> 3, 5 -> 2
    assert latents == [0, 2, 5, 7, 7][stage]


@pytest.mark.parametrize('stage', [0, 1, 2, 4])
@pytest.mark.parametrize('span_text', ['embedded', 'after_eot'])
def test_kept_steps_fed_as_embeddings(tok, stage, span_text):
  """`span_text` 'embedded': the gated layout's tokens and targets, with the latents alone as inner positions (the
  kept steps' gate hinged towards 0: token embeddings); 'after_eot': the kept steps after `<|eot|>` (COCONUT's
  arrangement), inner positions the latents too."""
  v = tok.vocab
  gated_cfg = coconut.Curriculum(c_thoughts=1, max_stage=3)
  cfg = coconut.Curriculum(c_thoughts=1, max_stage=3, span_text=span_text)
  kept = [s + '\n' for s in RECORD['steps']][stage:] if stage <= 3 else []
  latents = min(stage, 3)
  span, tail = (kept, []) if span_text == 'embedded' else ([], kept)
  expected = [v.bot] + [v.latent] * latents + _ids(tok, *span) + [v.eot] + _ids(tok, *tail, '109') + [v.eos]
  n = len(expected)
  batch = coconut.stage1_batch(coconut.build_batch([RECORD], 'dtt', stage, cfg, tok, 16, 40), v, span_text)
  gated = coconut.stage1_batch(coconut.build_batch([RECORD], 'dtt', stage, gated_cfg, tok, 16, 40), v)
  assert batch.completion[0, :n].tolist() == expected
  assert batch.inner_mask[0].tolist() == [0] + [1] * latents + [0] * (40 - 1 - latents)
  assert batch.loss_mask[0].tolist() == [1] + [0] * latents + [1] * (n - 1 - latents) + [0] * (40 - n)
  assert (batch.outer_mask[0] + batch.inner_mask[0]).tolist() == batch.completion_mask[0].tolist()
  if span_text == 'embedded':
    np.testing.assert_array_equal(batch.completion, gated.completion)
    np.testing.assert_array_equal(batch.loss_mask, gated.loss_mask)


@pytest.mark.parametrize('span_text', ['gated', 'embedded'])
def test_latent_hinge_before_final_frees_the_final_stages_latents(tok, span_text):
  """`latent_hinge='before_final'`: before the final stage the batches of 'always'; in it (stage K + 1) the latents
  leave both hinge terms (their gate set by the cross-entropy alone), every other position as before."""
  kw = dict(c_thoughts=1, max_stage=3, span_text=span_text, first_stage_epochs=1, epochs_per_stage=1)
  always, before = coconut.Curriculum(**kw), coconut.Curriculum(**kw, latent_hinge='before_final')
  make = lambda cfg: coconut.CurriculumBatches([RECORD] * 2, 'dtt', cfg, tok, 2, 16, 40, steps_per_epoch=1)
  a, b = make(always), make(before)
  for step in range(6):  # stages 0, 1, 2, 3, 4 (final), 4
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x.completion, y.completion)
    latents = x.completion == tok.vocab.latent
    if step < 4:
      np.testing.assert_array_equal(x.inner_mask, y.inner_mask)
      np.testing.assert_array_equal(x.outer_mask, y.outer_mask)
    else:
      assert latents.sum() == 2 * 3 and (x.inner_mask[latents] == 1).all()
      assert (y.inner_mask[latents] == 0).all() and (y.outer_mask[latents] == 0).all()
      np.testing.assert_array_equal(y.inner_mask[~latents], x.inner_mask[~latents])
      np.testing.assert_array_equal(y.outer_mask[~latents], x.outer_mask[~latents])


def test_pin_text_needs_pinned_latents():
  from dtt_jax.methods import dtt  # pylint: disable=g-import-not-at-top
  c = coconut_configs.get_config('addition2,dtt_compress,long')
  c.model.pin_text = True
  with pytest.raises(ValueError, match='config.model.pin_text=True .* needs config.model.pin_latent=True'):
    dtt.DTT().check_config(c)
  c.model.pin_latent = True
  dtt.DTT().check_config(c)


def test_unknown_latent_hinge_is_named():
  with pytest.raises(ValueError, match="config.coconut.latent_hinge='final': expected one of always, before_final"):
    coconut.Curriculum(latent_hinge='final')


def test_unknown_span_text_is_named():
  with pytest.raises(ValueError, match='config.coconut.span_text=.*gated, embedded, after_eot'):
    coconut.Curriculum(span_text='inside')


def test_the_forced_head_is_coconuts_without_its_eot(tok):
  """The compressing DTT's decoding forces `<|bot|>` and the latents of the checkpoint's stage (the final one after
  GRPO), or a budget of them; the seed's recipe forces nothing."""
  from dtt_jax.methods import dtt  # pylint: disable=g-import-not-at-top
  c = coconut_configs.get_config('addition2,dtt_compress,long')
  v = tok.vocab
  c.coconut.start_epoch = 16  # the study's: the run starts at stage 1, 1000 steps per stage
  assert dtt.forced_head(c, v, 'bootstrap', 1000) == (v.bot, v.latent)
  assert dtt.forced_head(c, v, 'bootstrap', 1001) == (v.bot, v.latent, v.latent)
  assert dtt.forced_head(c, v, 'bootstrap', 3150) == dtt.forced_head(c, v, 'grpo', 20) == (v.bot,) + (v.latent,) * 3
  assert dtt.forced_head(c, v, 'grpo', 20, budget=1) == (v.bot, v.latent)
  assert dtt.forced_head(coconut_configs.get_config('addition2,dtt,long'), v, 'grpo', 20) == ()


def test_final_layout_per_method(tok):
  """The checkpoints ranked for the headline (`final_accuracy`) are those trained in the method's final layout: the
  schedule's last stage for the step curriculum (the compressing DTT included), all CoT tokens removed for iCoT,
  every step for the layouts without a curriculum."""
  records = [RECORD] * 4
  cfg = coconut.Curriculum(c_thoughts=1, max_stage=3, epochs_per_stage=1, first_stage_epochs=2)
  final = {}
  for method in ('coconut', 'dtt', 'cot', 'pause', 'icot'):
    k = cfg if method != 'icot' else coconut.Curriculum(max_stage=3, epochs_per_stage=1, first_stage_epochs=2,
                                                       icot_delta=10.0, icot_pretrain_epochs=2, icot_lambda=np.inf)
    batches = coconut.CurriculumBatches(records, method, k, tok, 2, 16, 48, steps_per_epoch=10)
    final[method] = [s for s in range(400) if batches.is_final(s)][:1]
  assert final['coconut'] == final['dtt'] == [50]  # epochs 0-1 text, 2-4 stages 1-3, from epoch 5 the final stage
  assert final['cot'] == final['pause'] == [0]
  assert final['icot'] == [20 + 23]  # one token a step after 20 steps: the 23-token CoT is gone at step 43
  no_curriculum = coconut.Curriculum(max_stage=3, curriculum=False)
  assert coconut.CurriculumBatches(records, 'coconut', no_curriculum, tok, 2, 16, 48, steps_per_epoch=10).is_final(0)


def test_group_length_reward_ranks_the_lengths_of_a_group():
  """Kimi k1.5's length term: within each group, the shortest correct completion gets +0.5, the longest -0.5,
  linearly between; a wrong answer never gains from being short (min(0, lam)); a group of equal lengths carries no
  length signal (0), where the flat -0.01 per position would charge them all alike."""
  lengths = np.array([2, 4, 6, 3, 3, 3, 1, 9, 5, 5, 5, 5])
  correct = np.array([1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0], bool)
  out = group_length_reward(lengths, correct, group_size=3)
  np.testing.assert_allclose(out, [0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0])
  out = group_length_reward(np.array([1, 3, 5, 2]), np.array([0, 1, 0, 1], bool), group_size=4)
  np.testing.assert_allclose(out, [0.0, 0.0, -0.5, 0.25])
  with pytest.raises(ValueError, match='7 completions are not whole groups of 2'):
    group_length_reward(np.zeros(7), np.zeros(7, bool), 2)


def test_length_reward_enters_the_rewards_of_a_rollout_group():
  """compute_rewards with length='group' puts that term in `efficiency` (and the total), for rollouts of one prompt
  whose spans differ in length; 'exact' answer matching rejects what 'lenient' accepts."""
  v = tokens.Vocab.full()
  spans = [1, 2, 4, 1]
  toks = np.full((4, 9), v.eos, np.int32)
  for i, n in enumerate(spans):
    toks[i, :n + 3] = [v.bot] + [v.latent] * n + [v.eot, 16]
  mask = (np.arange(9)[None] < np.array([n + 4 for n in spans])[:, None]).astype(np.int32)
  texts = [f'{tokens.BOT}{tokens.EOT}{a}{tokens.EOS}' for a in ('12', '12', '12', '012')]
  flat = compute_rewards(toks, mask, np.zeros((4, 9)), texts, ['12'] * 4, 'addition', v)
  group = compute_rewards(toks, mask, np.zeros((4, 9)), texts, ['12'] * 4, 'addition', v, answer_match='exact',
                          length='group', group_size=4)
  np.testing.assert_allclose(flat['efficiency'], [-0.01, -0.02, -0.04, -0.01], atol=1e-7)
  assert flat['correct'].tolist() == [True] * 4  # leading zero: the lenient integer rule
  assert group['correct'].tolist() == [True, True, True, False]  # '012' != '12' exactly
  np.testing.assert_allclose(group['efficiency'], [0.5, 0.5 - 1 / 3, -0.5, 0.0], atol=1e-6)
  np.testing.assert_allclose(group['total'] - flat['total'],
                             group['efficiency'] - flat['efficiency'] + group['correctness'] - flat['correctness'],
                             atol=1e-6)


def test_the_compressing_configs():
  """`configs/coconut.py:<task>,dtt_compress[,long]`: DTT on the CoT span under the suite's stage schedule, c = 1
  forced latent per replaced step with its gate learned, GRPO with the group length reward."""
  c = coconut_configs.get_config('addition2,dtt_compress,long')
  assert (c.method, c.data.span, c.coconut.tokens_per_latent, c.coconut.c_thoughts) == ('dtt', 'curriculum', 0, 1)
  assert (c.grpo.length_reward, c.grpo.min_think, c.grpo.max_think) == ('group', 0, 4)
  assert (c.model.pin_latent, c.coconut.latent_targets, c.coconut.latent_jitter) == (False, False, True)
  assert c.coconut.span_text == 'embedded'
  assert (c.grpo.steps, coconut_configs.get_config('addition2,dtt,long').grpo.steps) == (1000, 20)
  seed = coconut_configs.get_config('addition2,dtt,long')
  assert (seed.data.span, seed.grpo.length_reward, seed.grpo.min_think) == ('cot', 'flat', 0)


def test_pinned_latent_gates_are_exactly_one_and_the_rest_stay_learned():
  """`model.pin_latent`: at a `<|latent|>` position the gate is 1 (its input exactly the previous hidden state),
  through the noise the rollout stores (so GRPO's re-scoring reproduces it); every other gate is the head's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dtt_jax.model.dtt import DTTConfig, DTTModel, pin_noise  # pylint: disable=g-import-not-at-top
  from dtt_jax.model.gpt2 import GPT2Config  # pylint: disable=g-import-not-at-top
  from dtt_jax.sampling import engine  # pylint: disable=g-import-not-at-top
  from dtt_jax.sampling.sampler import SamplingConfig  # pylint: disable=g-import-not-at-top

  model = DTTModel(DTTConfig(GPT2Config(vocab_rows=16, num_tokens=16, n_positions=32, n_embd=16, n_layer=1,
                                        n_head=2), gate_bias_init=0.0), rngs=nnx.Rngs(0))
  model.gate_head.kernel.value = jax.random.normal(jax.random.key(1), (16, 1))
  prompt, mask = jnp.array([[5, 6, 7]], jnp.int32), jnp.ones((1, 3), jnp.int32)
  cfg = engine.GenerateConfig(max_new_tokens=8, eos_id=0, bot_id=1, eot_id=2, sampling=SamplingConfig(),
                              gate_noise=True, pinned_id=3, early_stop=False)
  for key in range(40):  # a rollout with both latent and other tokens
    out = engine.generate(model, prompt, mask, jax.random.key(key), 0.7, cfg)
    if 0 < int(jnp.sum(out.tokens == 3)) < 8:
      break
  latent = np.asarray(out.tokens == 3)
  assert (np.asarray(out.gates)[latent] == 1.0).all() and (np.asarray(out.gates)[~latent] < 1.0).all()
  _, gates = engine.rescore(model, prompt, mask, out.tokens, out.hidden_inputs, out.gate_noise, 0.7)
  np.testing.assert_allclose(np.asarray(gates), np.asarray(out.gates), atol=1e-6)
  tokens = jnp.array([3, 4, 3])
  np.testing.assert_array_equal(pin_noise(jnp.zeros(3), tokens, 3), [1e4, 0.0, 1e4])
  np.testing.assert_array_equal(pin_noise(jnp.zeros(3), tokens, 3, pin_others=True), [1e4, -1e4, 1e4])
  np.testing.assert_array_equal(pin_noise(jnp.ones(3), tokens, -1), [1.0, 1.0, 1.0])


def test_jittered_latent_counts_from_stage_k_on(tok):
  """`latent_jitter`: from stage K on, each row's latent count is drawn uniformly in [0, K c] from (seed, step,
  record), the same on a resumed run; before stage K, and without the option, the stage's count."""
  cfg = coconut.Curriculum(c_thoughts=1, max_stage=3, epochs_per_stage=1, latent_jitter=True)
  draws = [cfg.jittered_latents(0, step, 7, 4) for step in range(400)]
  assert set(draws) == {0, 1, 2, 3} and draws == [cfg.jittered_latents(0, step, 7, 4) for step in range(400)]
  assert cfg.jittered_latents(0, 5, 7, 2) is None
  assert coconut.Curriculum(max_stage=3).jittered_latents(0, 5, 7, 4) is None
  batches = coconut.CurriculumBatches([RECORD] * 8, 'dtt', cfg, tok, 8, 16, 40, steps_per_epoch=10)
  batches.step = 50  # epoch 5: the final stage K + 1 = 4
  assert batches.stage(50) == 4
  batch = next(batches)
  rows = [coconut.build_sample(RECORD, 'dtt', 4, cfg, tok, n).completion.tolist()
          for n in [cfg.jittered_latents(0, 50, int(i), 4) for i in batches.rows.global_rows(0, 0)]]
  assert [r.tolist()[:len(x)] for r, x in zip(batch.completion, rows)] == rows
  assert len({int(m.sum()) for m in batch.inner_mask}) > 1  # the rows' spans differ in length


@pytest.mark.parametrize('closed_by', ['gate_head', 'pin_text'])
def test_pinned_latents_with_closed_gates_compute_coconuts_loss_and_gradient(closed_by):
  """The compressing DTT's bootstrap loss (the exact recurrent unroll with its hand-written backward, latents'
  gates pinned to 1) on COCONUT's batch, with every other gate closed (by the gate head, or pinned to 0 through the
  noise: `model.pin_text`), is COCONUT's loss (one pass per latent, the previous hidden state fed back) with the
  same gradient: the two recipes differ in their layouts and gate terms, not in how a continuous thought is
  computed or trained."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dtt_jax.model.dtt import DTTConfig, DTTModel, pin_noise  # pylint: disable=g-import-not-at-top
  from dtt_jax.model.gpt2 import GPT2Config  # pylint: disable=g-import-not-at-top
  from dtt_jax.train import bootstrap, coconut as coconut_train  # pylint: disable=g-import-not-at-top

  model = DTTModel(DTTConfig(GPT2Config(vocab_rows=16, num_tokens=16, n_positions=32, n_embd=16, n_layer=2,
                                        n_head=2)), rngs=nnx.Rngs(0))
  if closed_by == 'gate_head':
    model.gate_head.kernel.value = jnp.zeros_like(model.gate_head.kernel.value)
    model.gate_head.bias.value = jnp.full_like(model.gate_head.bias.value, -100.0)  # every unpinned gate 0
  else:  # a head that would open gates: the noise closes them
    model.gate_head.kernel.value = jax.random.normal(jax.random.key(1), model.gate_head.kernel.value.shape)
  pin_others = closed_by == 'pin_text'
  latent_id = 3
  completion = jnp.array([[1, 3, 3, 2, 9, 10, 11, 12, 0], [1, 3, 3, 2, 10, 9, 11, 13, 0]], jnp.int32)
  latent = (completion == latent_id).astype(jnp.int32)
  loss_mask = jnp.array([[0, 0, 0, 0, 1, 1, 1, 1, 1]] * 2, jnp.int32)
  shared = {'prompt': jnp.array([[0, 5, 6, 7], [5, 6, 7, 8]], jnp.int32),
            'prompt_mask': jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], jnp.int32),
            'completion': completion, 'loss_mask': loss_mask}
  coconut_batch = {**shared, 'latent_mask': latent}
  dtt_batch = {**shared, 'inner_mask': latent, 'outer_mask': 1 - latent, 'filler_mask': jnp.zeros_like(latent),
               'completion_mask': jnp.ones_like(latent)}
  cfg = bootstrap.LossConfig(pinned_id=latent_id, gate_noise=False, pin_others=pin_others)
  noise = pin_noise(jnp.zeros(completion.shape), completion, latent_id, pin_others)
  graphdef, params = nnx.split(model)

  def coconut_loss(p):
    return coconut_train.coconut_loss(nnx.merge(graphdef, p), coconut_batch)[0]

  def dtt_loss(p):
    return bootstrap.loss_terms(nnx.merge(graphdef, p), dtt_batch, noise, 0.1, cfg,
                                bootstrap._counts(dtt_batch))[0]  # pylint: disable=protected-access

  (want, want_grad), (got, got_grad) = jax.value_and_grad(coconut_loss)(params), jax.value_and_grad(dtt_loss)(params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grad, want_grad)
  assert float(jnp.max(jnp.abs(want_grad['gpt2']['wte']['embedding'].value))) > 0.01  # a gradient worth comparing
