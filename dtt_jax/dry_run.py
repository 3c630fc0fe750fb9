"""`--config.dry_run=True`: what a run would need per device, before it starts (no weights read, nothing trained,
the workdir untouched; CPU is enough).

The model and both training states are built as abstract arrays (`jax.eval_shape`), laid out by the rule table of
`parallel.py` for the config's mesh (`config.num_devices` x `config.parallel.fsdp`; the mesh need not exist here),
and the bootstrap and GRPO steps are compiled for one device's share of their batches. Reported per device:
parameters (`model.param_dtype`), gradients and optimizer state of the trained parameters, the frozen GRPO
reference (beta > 0), and the step's temporary buffers as XLA's buffer assignment on this backend gives them (an
estimate of activations: another backend fuses and schedules differently, and XLA's CPU backend keeps bf16
intermediates in float32 and rematerializes nothing, so on an accelerator expect less). FLOPs per step: the model
estimate 6 x parameters x tokens of the global batch (GRPO: times `mu`), with XLA's cost analysis of the compiled
step beside it, which counts the body of a loop once (the bootstrap's recurrent unroll, the output layer's tiles),
so it is a lower bound there.

The trunk's sizes: `config.model` (scratch, or a hub checkpoint not on this machine: `model.family`, `n_embd`,
`n_layer`, `n_head`, `n_kv_head`, `intermediate_size`, `vocab_size`, ...), or the `config.json` of a local
checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtt_jax import parallel, tokens
from dtt_jax.methods import dtt as dtt_method
from dtt_jax.model import build_model, hf_io, lora
from dtt_jax.rl import grpo, rollout
from dtt_jax.train import bootstrap, state as state_lib

GIB = 2**30


def model_section(c):
  """`config.model` as a scratch model of the run's sizes (from a local checkpoint's config.json when there is
  one), and the tokenizer ids before the DTT specials."""
  m = c.model.copy_and_resolve_references()
  if m.init != 'scratch' and os.path.isdir(m.init):
    hf = hf_io.read_config_json(m.init)
    m.family = hf_io.model_family(hf)
    m.n_embd, m.n_layer, m.n_head = hf.get('hidden_size', hf.get('n_embd')), hf.get(
        'num_hidden_layers', hf.get('n_layer')), hf.get('num_attention_heads', hf.get('n_head'))
    if m.family != 'gpt2':
      m.n_kv_head = hf.get('num_key_value_heads') or m.n_head
      m.intermediate_size, m.rope_theta = hf['intermediate_size'], float(hf.get('rope_theta', m.rope_theta))
      m.tie_word_embeddings = bool(hf.get('tie_word_embeddings', False))
    m.vocab_size = m.get('vocab_size') or hf['vocab_size']
  base = m.get('vocab_size') or tokens.GPT2_BASE_VOCAB
  m.init, m.vocab = 'scratch', 'full'
  return m, base


def abstract_vocab(base: int) -> tokens.Vocab:
  """A full vocabulary of `base` tokenizer ids plus the DTT specials (shapes only: its last id stands for eos)."""
  if base == tokens.GPT2_BASE_VOCAB:
    return tokens.Vocab.full()
  return tokens.Vocab(None, base=base, eos_id=base - 1, reserved_ids=(base - 1,), copy_id=0, checkpoint_ids=base)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _bytes(tree, fsdp: int, itemsize: int | None = None) -> int:
  """Bytes on one device of `tree` laid out by the rule table at `fsdp` ways."""
  return sum(math.prod(parallel.shard_shape(np.shape(x), fsdp)) * (itemsize or np.dtype(x.dtype).itemsize)
             for x in jax.tree.leaves(tree))


def _step_cost(step, state, args) -> tuple[float, int]:
  """(FLOPs, temporary bytes) of a jitted step compiled for abstract `state` and the step's other `args` on one
  device."""
  compiled = step.lower(state, *args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  return float(cost.get('flops', float('nan'))), int(getattr(memory, 'temp_size_in_bytes', 0))


@dataclasses.dataclass
class StepMemory:
  """Bytes per device while one training step runs, and the step's FLOPs over the global batch."""

  step: str
  params: int
  grads: int
  optimizer: int
  reference: int
  temporaries: int
  flops: float  # XLA's cost analysis of the compiled step, scaled to the global batch (loop bodies counted once)
  model_flops: float  # 6 x parameters x tokens of the global batch

  @property
  def total(self) -> int:
    return self.params + self.grads + self.optimizer + self.reference + self.temporaries


def _abstract_model(c, m, vocab):
  """(graphdef, abstract params) of the model `m` (a `config.model` section) for `vocab`."""
  graphdef, params = state_lib.split_model(
      nnx.eval_shape(lambda: build_model(m, vocab, seed=c.seed, lora_cfg=c.get('lora'))))
  return graphdef, _abstract(params)


def _step_costs(c, m, vocab, steps) -> list[tuple[float, int]]:
  """[(FLOPs, temporary bytes)] of each (optimizer, make_step, step arguments after the state) of `steps` on
  model `m`, one device."""
  graphdef, params = _abstract_model(c, m, vocab)
  mesh = parallel.make_mesh(1)
  out = []
  for tx, make_step, args in steps:
    state = jax.eval_shape(lambda p, tx=tx: state_lib.init_state(p, tx, seed=c.seed), params)
    out.append(_step_cost(make_step(graphdef, tx, mesh), state, args))
  return out


def estimate(c, compile_steps: bool = True) -> tuple[str, int, list[StepMemory]]:
  """(a line describing the run, its number of parameters, the bootstrap and GRPO steps' `StepMemory`); without
  `compile_steps`, their temporaries and FLOPs are 0. Beyond 2 layers the steps are compiled at 1 and 2 layers and
  their FLOPs and temporaries extended linearly to `n_layer` (every block costs the same), which keeps the dry run
  of a large model to a few small compilations."""
  m, base = model_section(c)
  num_devices = c.num_devices or jax.device_count()
  fsdp = c.get('parallel', {}).get('fsdp', 1)
  if fsdp < 1 or num_devices % fsdp:
    raise ValueError(f'config.parallel.fsdp={fsdp} must divide config.num_devices={num_devices}.')
  vocab = abstract_vocab(base)
  _, params = _abstract_model(c, m, vocab)
  param_bytes = _bytes(params, fsdp, np.dtype(m.param_dtype).itemsize)

  b, g = c.bootstrap, c.grpo
  p, t = c.data.max_prompt_len, c.data.max_completion_len
  rows = max(b.batch_size // num_devices // b.microbatches, 1)
  boot_batch = {k: jax.ShapeDtypeStruct((rows, p if k.startswith('prompt') else t), jnp.int32)
                for k in bootstrap.BATCH_FIELDS}
  loss_cfg = bootstrap.LossConfig.from_config(b)
  cfg = grpo.GRPOConfig.from_config(g)
  completions = max(g.prompts_per_step * g.num_generations // num_devices, 1)
  boot_tx = dtt_method.bootstrap_optimizer(c)
  grpo_tx = grpo.make_grpo_optimizer(g, lora.configured_train_modules(c.get('lora')))
  specs = [(boot_tx, lambda gd, tx, mesh: bootstrap.make_train_step(gd, tx, loss_cfg, mesh, 1),
            (boot_batch, jnp.float32(1.0))),  # the batch and the gate temperature tau
           (grpo_tx, lambda gd, tx, mesh: grpo.make_grpo_step(gd, tx, cfg, mesh),
            (_rollout_batch(completions, p, g.max_new_tokens, m.n_embd),))]
  if not compile_steps:
    costs = [(0.0, 0)] * len(specs)
  elif m.n_layer <= 2:
    costs = _step_costs(c, m, vocab, specs)
  else:
    one, two = (_step_costs(c, _with_layers(m, k), vocab, specs) for k in (1, 2))
    costs = [(f1 + (m.n_layer - 1) * (f2 - f1), t1 + (m.n_layer - 1) * (t2 - t1))
             for (f1, t1), (f2, t2) in zip(one, two)]
  steps = []
  n_params = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
  tokens = (b.batch_size * (p + t), g.prompts_per_step * g.num_generations * (p + g.max_new_tokens) * cfg.mu)
  for (name, tx, reference, per_step), (flops, temp), n_tokens in zip(
      (('bootstrap', boot_tx, False, b.microbatches), ('grpo', grpo_tx, bool(cfg.beta), 1)), costs, tokens):
    opt_state = jax.eval_shape(tx.init, params)
    steps.append(StepMemory(name, param_bytes, grads=_bytes(params, fsdp, 4),  # every parameter's: the norm reads them
                            optimizer=_bytes(opt_state, fsdp), reference=param_bytes if reference else 0,
                            temporaries=temp, flops=flops * num_devices * per_step,
                            model_flops=6.0 * n_params * n_tokens))
  compact = ' (compact vocabulary: counted as the full one, an upper bound)' if c.model.vocab == 'compact' else ''
  kv = f' ({m.n_kv_head or m.n_head} kv)' if m.family != 'gpt2' else ''
  line = (f'{m.family}, {m.n_layer} layers, d={m.n_embd}, {m.n_head} heads{kv}, {vocab.num_rows} vocabulary '
          f'rows{compact}; compute {m.dtype}, parameters {m.param_dtype}; {num_devices} devices as '
          f'data={num_devices // fsdp} x fsdp={fsdp}. Per device and step: bootstrap {rows} rows x {p}+{t} tokens '
          f'x {b.microbatches} microbatches, GRPO {completions} completions x {p}+{g.max_new_tokens} tokens.')
  return line, n_params, steps


def _with_layers(m, n_layer: int):
  m = m.copy_and_resolve_references()
  m.n_layer = n_layer
  return m


def report(c) -> str:
  """The dry run's report (see the module docstring)."""
  line, n_params, steps = estimate(c)
  gib = lambda x: f'{x / GIB:.2f}'
  lines = [f'Dry run ({jax.devices()[0].platform}): {n_params / 1e6:.1f}M parameters, {line}', '',
           '| step | params | grads | optimizer | GRPO reference | temporaries | total (GiB per device) | '
           'TFLOPs per step: 6 N tokens | XLA (loops once) |', '|---|---|---|---|---|---|---|---|---|']
  lines += [f'| {r.step} | {gib(r.params)} | {gib(r.grads)} | {gib(r.optimizer)} | {gib(r.reference)} | '
            f'{gib(r.temporaries)} | {gib(r.total)} | {r.model_flops / 1e12:.3g} | {r.flops / 1e12:.3g} |'
            for r in steps]
  return '\n'.join(lines)


def _rollout_batch(n: int, p: int, t: int, d: int) -> grpo.RolloutBatch:
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  return grpo.RolloutBatch(
      prompt=i32(n, p), prompt_mask=i32(n, p), completion=i32(n, t), completion_mask=i32(n, t), forced=i32(n, t),
      logprobs=f32(n, t), ref_logprobs=f32(n, t), gates=f32(n, t), gate_noise=f32(n, t), hidden_inputs=f32(n, t, d),
      inner_mask=f32(n, t), outer_mask=f32(n, t), tau=f32(n), rewards=f32(n),
      stats={name: f32(n) for name in rollout.STATS})
