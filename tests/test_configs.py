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
    ('model.dropout', 0.1, "config.model.dropout=0.1 applies only to the COCONUT methods (coconut, pause_as_thought, "
                           "cot, no_cot, pause, coconut_no_thought, icot): set it to 0 for config.method='dtt'"),
])
def test_bad_values_are_named(key, value, message):
  config = importlib.import_module('configs.quickstart').get_config()
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    pipeline.check_config(config)


def test_pretrained_model_needs_full_vocab():
  config = importlib.import_module('configs.gsm8k').get_config()
  config.model.vocab = 'compact'
  with pytest.raises(ValueError, match='model.vocab="compact" only works with config.model.init="scratch"'):
    pipeline.check_config(config)
