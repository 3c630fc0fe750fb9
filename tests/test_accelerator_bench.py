"""benchmarks/accelerator.py's arithmetic: the peak table lookup, the forward-FLOPs formula, and the two benchmark
models' shapes (abstract: nothing is allocated) against the published parameter counts."""

import importlib.util
import os

import jax
import pytest
from flax import nnx

from configs import base
from dtt_jax.model import build_model

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'accelerator.py')
_SPEC = importlib.util.spec_from_file_location('benchmarks_accelerator', _PATH)
acc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(acc)


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5p', 459e12),
    ('TPU v6 lite', 918e12), ('cpu', None), ('NVIDIA GeForce RTX 3090', None)])
def test_peak_table(kind, peak):
  assert acc.peak_flops(kind) == peak


def test_forward_flops_and_mfu():
  # 2 N S + 2 V D T + 4 L A S(S+1)/2 with N=10, S=4, V=7, D=3, T=2, L=2, A=5
  assert acc.forward_flops(10, 7, 3, 2, 5, seq=4, out_positions=2) == 80 + 84 + 4 * 2 * 5 * 10
  assert acc.mfu(2e12, 2.0, 1e12) == 1.0
  assert acc.mfu(1.0, 1.0, None) is None


@pytest.mark.parametrize('name, trunk_params', [
    ('gpt2_small', 124_439_808 + 47 * 768),  # HF gpt2 (50257 rows) + the 47 rows up to 50304
    ('qwen2_0p5b', 494_032_768),  # Qwen2.5-0.5B
])
def test_benchmark_models_have_the_published_shapes(name, trunk_params):
  m = base.get_config().model
  m.update(dict(acc.MODELS[name], n_positions=1024, dtype='bfloat16', param_dtype='float32'))
  model = nnx.eval_shape(lambda: build_model(m, acc.model_vocab(name)))
  params = nnx.state(model.gpt2, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == trunk_params
  counts = acc.shape_counts(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.gpt2.cfg)
  if name == 'qwen2_0p5b':
    assert counts['matmul_params'] == 24 * (2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864) + 896  # + gate head
    assert counts['output_rows'] == 151936 and counts['attn_width'] == 896
