"""Every shipped config loads, takes a stage suffix, and passes the value checks; bad values name their key."""

import importlib

import pytest

from dtt_jax import pipeline

CONFIGS = ('base', 'quickstart', 'addition', 'addition_cot', 'gsm8k', 'prosqa', 'prontoqa', 'hrpo', 'lora',
           'think_tokens')  # configs/coconut.py: tests/test_coconut_pipeline.py


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_valid(name):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config() if name == 'base' else module.get_config('grpo')
  pipeline.check_config(config)
  if name != 'base':
    assert config.stage == 'grpo'


@pytest.mark.parametrize('key,value,message', [
    ('stage', 'train', "config.stage='train': expected one of 'bootstrap', 'grpo', 'eval', 'pipeline'"),
    ('model.vocab', 'small', "config.model.vocab='small'"),
    ('bootstrap.batch_size', 0, 'config.bootstrap.batch_size=0 must be positive'),
    ('model.dropout', 0.1, "config.model.dropout=0.1 applies only to the methods with a supervised stage (dtt, "
                           "coconut, pause_as_thought, cot, no_cot, pause, coconut_no_thought, icot): set it to 0 for "
                           "config.method='think_tokens'"),
    ('bootstrap.schedule', 'cosine', "config.bootstrap.schedule='cosine': expected one of 'warmup_cosine', 'constant'"),
    ('bootstrap.decay', 'none', "config.bootstrap.decay='none': expected one of 'matrices', 'all'"),
    ('eval.answer_match', 'strict', "config.eval.answer_match='strict': expected one of 'exact', 'lenient'"),
    ('data.span', 'steps', "config.data.span='steps': expected one of 'none', 'cot', 'curriculum'"),
])
def test_bad_values_are_named(key, value, message):
  config = importlib.import_module('configs.quickstart').get_config()
  if key == 'model.dropout':
    config.method = 'think_tokens'
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    pipeline.check_config(config)


def test_pretrained_model_needs_full_vocab():
  config = importlib.import_module('configs.gsm8k').get_config()
  config.model.vocab = 'compact'
  with pytest.raises(ValueError, match='model.vocab="compact" only works with config.model.init="scratch"'):
    pipeline.check_config(config)
