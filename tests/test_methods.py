"""The method interface (`dtt_jax/methods/`): the pipeline runs any registered method by `config.method` alone, so a
new method is one module (here a class defined in the test) plus one config."""

import pytest

from configs import quickstart
from dtt_jax import methods, pipeline
from dtt_jax.data import coconut as coconut_data
from dtt_jax.methods import base
from dtt_jax.train import loop


class Recorder(base.Method):
  """Two stages that record their calls; its layout adds a word to the vocabulary."""

  stages = ('first', 'second')
  calls = []

  def vocab_texts(self, c, records):
    return [' zebra']

  def check_config(self, c):
    if c.seed < 0:
      raise ValueError('config.seed must be >= 0 for this method.')

  def train(self, exp, stage):
    self.calls.append(('train', stage))
    return loop.LoopResult(state=None, step=1, interrupted=stage == exp.config.get('interrupt_at'),
                           last_validation={})

  def evaluate(self, exp):
    self.calls.append(('evaluate',))
    return {}


class OneStage(Recorder):
  stages = ('only',)


@pytest.fixture
def recorder(monkeypatch, hf_tokenizer):
  del hf_tokenizer  # the shared tokenizer must be present
  monkeypatch.setitem(methods.REGISTRY, 'recorder', Recorder())
  monkeypatch.setitem(methods.REGISTRY, 'one_stage', OneStage())
  Recorder.calls = []
  return Recorder.calls


def _config(method, stage):
  c = quickstart.get_config()
  c.method, c.stage = method, stage
  c.dataset.train_size, c.dataset.valid_size = 64, 8
  c.eval.size = 8
  return c


@pytest.mark.parametrize('stage, expected', [
    ('bootstrap', [('train', 'first')]),
    ('grpo', [('train', 'second')]),
    ('pipeline', [('train', 'first'), ('train', 'second'), ('evaluate',)]),
    ('eval', [('evaluate',)]),
])
def test_pipeline_runs_a_registered_method_by_config_stage(recorder, tmp_path, stage, expected):
  pipeline.run(_config('recorder', stage), str(tmp_path))
  assert recorder == expected


def test_an_interrupted_stage_stops_the_run(recorder, tmp_path):
  c = _config('recorder', 'pipeline')
  c.interrupt_at = 'first'
  pipeline.run(c, str(tmp_path))
  assert recorder == [('train', 'first')]


def test_method_texts_join_the_compact_vocabulary(recorder, tmp_path):
  del recorder
  exp = pipeline.setup(_config('recorder', 'bootstrap'), str(tmp_path / 'recorder'))
  plain = pipeline.setup(_config('dtt', 'bootstrap'), str(tmp_path / 'dtt'))
  zebra = exp.tokenizer.encode_gpt2(' zebra')
  assert all(exp.vocab.to_model([i])[0] >= 0 for i in zebra)
  assert exp.vocab.num_tokens == plain.vocab.num_tokens + len(set(zebra) - set(plain.vocab.gpt2_ids))


def test_config_errors_name_the_method_and_stage(recorder):
  del recorder
  with pytest.raises(ValueError, match='config.stage="grpo" does not apply to config.method=\'one_stage\', whose '
                                       'only trained stage is \'only\''):
    pipeline.check_config(_config('one_stage', 'grpo'))
  c = _config('recorder', 'pipeline')
  c.seed = -1
  with pytest.raises(ValueError, match='config.seed must be >= 0 for this method'):
    pipeline.check_config(c)
  c = _config('recorder', 'pipeline')
  c.model.dropout = 0.1
  with pytest.raises(ValueError, match=r"config.model.dropout=0.1 applies only to the methods with a supervised "
                                       r"stage \(dtt, coconut, .*\): set it to 0 for config.method='recorder'"):
    pipeline.check_config(c)


def test_registry_names_every_method_once():
  assert list(methods.REGISTRY)[:2] == ['dtt', 'think_tokens']
  assert set(methods.REGISTRY) == {'dtt', 'think_tokens', *coconut_data.METHODS}
  assert {type(m).__name__ for m in methods.REGISTRY.values()} == {'DTT', 'ThinkTokens', 'CurriculumMethod'}
  with pytest.raises(ValueError, match="config.method='latent': expected one of 'dtt', 'think_tokens', 'coconut'"):
    methods.get('latent')
