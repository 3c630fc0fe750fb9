"""`--config.dry_run`: per-device memory and FLOPs from abstract arrays, nothing written (dtt_jax/dry_run.py)."""

import math
import os

import jax
import pytest
from flax import nnx

from configs import qwen_gsm8k, quickstart
from dtt_jax import dry_run, pipeline
from dtt_jax.model import build_model


def _tiny_qwen(fsdp: int, beta: float = 0.04):
  """A scratch Qwen2 of 1000 tokenizer ids (1024 rows), 4 devices."""
  c = quickstart.get_config()
  m = c.model
  m.family, m.vocab, m.vocab_size = 'qwen2', 'full', 1000
  m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.intermediate_size = 1, 64, 4, 2, 128
  c.num_devices, c.parallel.fsdp = 4, fsdp
  c.bootstrap.batch_size, c.bootstrap.microbatches = 8, 2
  c.grpo.prompts_per_step, c.grpo.num_generations, c.grpo.beta = 4, 2, beta
  return c


def test_memory_is_the_rule_tables_and_flops_the_compiled_steps():
  _, n_params, (boot, grpo) = dry_run.estimate(_tiny_qwen(fsdp=1))
  m, _ = dry_run.model_section(_tiny_qwen(1))
  vocab = dry_run.abstract_vocab(1000)
  model = nnx.eval_shape(lambda: build_model(m, vocab))
  assert vocab.num_rows == 1024
  assert n_params == sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert boot.params == boot.grads == grpo.reference == 4 * n_params  # float32, replicated
  assert boot.optimizer == grpo.optimizer and 0 <= boot.optimizer - 8 * n_params <= 64  # Adam's moments, counts
  assert boot.reference == 0 and boot.temporaries > 0 and grpo.temporaries > 0
  c = _tiny_qwen(1)
  tokens = c.bootstrap.batch_size * (c.data.max_prompt_len + c.data.max_completion_len)
  assert boot.model_flops == 6 * n_params * tokens
  assert 0.1 < boot.flops / boot.model_flops < 5  # XLA's count of the compiled step (a loop body counted once)

  _, _, (boot4, grpo4) = dry_run.estimate(_tiny_qwen(fsdp=4, beta=0.0), compile_steps=False)
  assert 0.25 <= boot4.params / boot.params < 0.3  # all but the small arrays split 4 ways
  assert boot4.optimizer / boot.optimizer == pytest.approx(boot4.params / boot.params, rel=1e-3)
  assert grpo4.reference == 0


def test_dry_run_prints_the_report_and_leaves_the_workdir_alone(tmp_path, capsys):
  c = _tiny_qwen(fsdp=2)
  c.dry_run = True
  workdir = str(tmp_path / 'never')
  pipeline.run(c, workdir)
  out = capsys.readouterr().out
  assert not os.path.exists(workdir)
  assert 'qwen2, 1 layers, d=64, 4 heads (2 kv), 1024 vocabulary rows' in out and 'data=2 x fsdp=2' in out
  assert '| bootstrap |' in out and '| grpo |' in out


def test_lora_runs_count_trained_gradients_and_a_reference_without_the_trunk():
  """LoRA: gradients (float32) and the GRPO reference hold the trained parameters only (adapters, gate, `wte`)."""
  c = _tiny_qwen(fsdp=1)
  c.lora.enabled, c.lora.targets, c.lora.train_modules = True, ('self_attn.q_proj',), ('wte',)
  _, n_params, (boot, grpo_step) = dry_run.estimate(c, compile_steps=False)
  m, base_ids = dry_run.model_section(c)
  params = nnx.state(nnx.eval_shape(lambda: build_model(m, dry_run.abstract_vocab(base_ids), lora_cfg=c.lora)),
                     nnx.Param)
  trained = sum(math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)
                if {'lora', 'wte', 'gate_head'} & {getattr(k, 'key', None) for k in path})
  assert boot.params == grpo_step.params == 4 * n_params
  assert boot.grads == grpo_step.reference == 4 * trained and 0 < trained < 0.7 * n_params


def test_report_shows_the_temporaries_without_remat_beside_them(monkeypatch):
  c = _tiny_qwen(fsdp=4)
  c.model.remat = 'block'
  compiled = []

  def costs(config, m, vocab, specs, mesh):  # (FLOPs, temporaries) per step, as compiled
    compiled.append((m.remat, mesh.shape['fsdp']))
    return [(1e12, 2**30 if m.remat == 'block' else 3 * 2**30)] * len(specs)

  monkeypatch.setattr(dry_run, '_compiled_costs', costs)
  out = dry_run.report(c)
  assert compiled == [('block', 4), ('none', 4)] and 'remat block; 4 devices as data=1 x fsdp=4' in out
  assert '| temporaries | total (GiB per device) | temporaries without remat |' in out
  assert all(' | 1.00 | ' in row and ' | 3.00 | ' in row for row in out.splitlines() if row.startswith('| boot'))


def test_qwen_configs_are_valid_and_name_their_sizes():
  for size, hidden in (('0.5b', 896), ('1.5b', 1536), ('3b', 2048)):
    c = qwen_gsm8k.get_config(size)
    pipeline.check_config(c)
    assert (c.model.family, c.model.n_embd, c.model.dtype, c.lora.rank) == ('qwen2', hidden, 'bfloat16', 32)
    assert c.bootstrap.batch_size % c.num_devices == 0 and c.grpo.prompts_per_step % c.num_devices == 0
    assert (c.model.vocab_size, c.model.remat, c.parallel.fsdp) == (151665, 'block', c.num_devices)
    rows, completions = c.bootstrap.batch_size // c.num_devices, c.grpo.prompts_per_step * 4 // c.num_devices
    assert rows % c.bootstrap.microbatches == 0 and completions % c.grpo.microbatches == 0
  with pytest.raises(ValueError, match='configs/qwen_gsm8k.py:\'7b\': expected "<size>'):
    qwen_gsm8k.get_config('7b')
