"""Shared test setup: 4 CPU devices for sharding tests, and the path of ../shared/data."""

import atexit
import os
import shutil
import tempfile

# Tests compile hundreds of tiny programs and run each a few steps: LLVM's optimizations cost more than they save
# (a 4-step CLI run: 35 s at the default level, 22 s at 0). Numerics are IEEE either way (no fast-math at any level).
FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process (or a CLI subprocess) with `devices` CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'


os.environ.setdefault('XLA_FLAGS', xla_flags(4))
if FAST_COMPILE not in os.environ['XLA_FLAGS']:  # .ci/run sets the device count only
  os.environ['XLA_FLAGS'] += ' ' + FAST_COMPILE
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# One XLA compilation cache for the session and the CLI subprocesses it starts (they compile the same tiny programs
# many times: the workdir tests run ~30 of them). Compiled code is keyed by the program, so results are unchanged.
# pytest-xdist's workers inherit the cache of the process that made it; that process removes it at exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='dtt_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / 'shared' / 'data'
TOKENIZER_DIR = SHARED_DATA / 'gpt2_tokenizer'


def require_shared(*parts: str) -> pathlib.Path:
  """Path under ../shared/data, or skip the test saying what is missing."""
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'{path} is absent: the real datasets live in ../shared/data beside the project checkout '
                '(see README, "Data").')
  return path


@pytest.fixture(scope='session')
def hf_tokenizer():
  from dtt_jax import tokens  # pylint: disable=g-import-not-at-top
  return tokens.load_tokenizer(str(require_shared('gpt2_tokenizer')))
