"""`--config.dry_run=True`: what a run would need per device, before it starts (no weights read, nothing trained,
the workdir untouched; CPU is enough).

The model and both training states are built as abstract arrays (`jax.eval_shape`) with the vocabulary a run builds
(its tokenizer's size: `model_section`), laid out by the rule table of `parallel.py` for the config's mesh
(`config.num_devices` x `config.parallel.fsdp`), and the bootstrap and GRPO steps, as a run builds them (remat,
microbatches, trained parameters, per-layer gathers), are compiled for that mesh: on the default backend when it has
that many devices, else on as many CPU devices (asked of XLA's CPU backend before JAX starts; `request_devices`).
Reported per device: parameters (`model.param_dtype`), gradients and optimizer state of the trained parameters (a
LoRA run's adapters, gate and `lora.train_modules`), what the GRPO reference keeps (beta > 0: the trained
parameters, `grpo.reference_params`), and the step's temporary buffers as XLA's buffer assignment gives them for one
device: activations, gathered weights, gradients before their reduce-scatter (another backend fuses and schedules
differently: XLA's CPU backend keeps bf16 intermediates in float32, so on an accelerator expect less). With
`model.remat` on, the temporaries without it are reported beside them. FLOPs per step: the model estimate 6 x
parameters x tokens of the global batch (GRPO: times `mu`), with XLA's cost analysis of the compiled step beside it,
which counts the body of a loop once (microbatches, the bootstrap's recurrent unroll, the output layer's tiles), so
it is a lower bound there.

The trunk's sizes: `config.model` (scratch, or a hub checkpoint not on this machine: `model.family`, `n_embd`,
`n_layer`, `n_head`, `n_kv_head`, `intermediate_size`, and `vocab_size`: the size of its tokenizer, `len(tokenizer)`
before the DTT specials), or the `config.json` and tokenizer of a local checkpoint directory.
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
from dtt_jax.train import bootstrap, grads as grads_lib, state as state_lib

GIB = 2**30


def model_section(c):
  """`config.model` as a scratch model of the run's sizes (from a local checkpoint's config.json when there is
  one), and the tokenizer ids before the DTT specials (`tokenizer_base`)."""
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
  base = tokenizer_base(c.model)
  m.init, m.vocab = 'scratch', 'full'
  return m, base


def tokenizer_base(m) -> int:
  """The tokenizer ids before the DTT specials of a run of `config.model` `m` (the rows it builds: these + 4,
  padded to 128): its tokenizer's when that is on this machine (`model.tokenizer`, or a local checkpoint's own),
  else `model.vocab_size` (a hub checkpoint's tokenizer size), else GPT-2's."""
  local = m.get('tokenizer') if m.get('tokenizer') and os.path.isdir(m.tokenizer) else ''
  if not local and m.init != 'scratch' and os.path.isdir(m.init):
    local = hf_io.tokenizer_source(m, gpt2_dir='')  # the checkpoint itself when it has a tokenizer of its own
    local = local if local == m.init else ''
  if local:
    return tokens.full_vocab(tokens.load_tokenizer(local)).base
  return m.get('vocab_size') or tokens.GPT2_BASE_VOCAB


def abstract_vocab(base: int) -> tokens.Vocab:
  """A full vocabulary of `base` tokenizer ids plus the DTT specials (shapes only: its last id stands for eos)."""
  if base == tokens.GPT2_BASE_VOCAB:
    return tokens.Vocab.full()
  return tokens.Vocab(None, base=base, eos_id=base - 1, reserved_ids=(base - 1,), copy_id=0, checkpoint_ids=base)


def request_devices(num_devices: int) -> None:
  """Asks XLA's CPU backend for `num_devices` devices, for the steps' compilation on the run's mesh; only possible
  before JAX starts its backends (a later call changes nothing: `mesh_devices` then uses what there is)."""
  if num_devices > 1:
    try:
      jax.config.update('jax_num_cpu_devices', num_devices)
    except RuntimeError:  # the backends are running
      pass


def mesh_devices(num_devices: int) -> list:
  """`num_devices` devices to compile the steps on: the default backend's when it has that many, else the CPU's."""
  for devices in (jax.devices(), jax.devices('cpu')):
    if len(devices) >= num_devices:
      return devices[:num_devices]
  raise ValueError(f'The dry run compiles the steps for config.num_devices={num_devices} devices but JAX has '
                   f'{len(jax.devices("cpu"))} CPU devices: run it as `python -m dtt_jax.main ... '
                   '--config.dry_run=True` (which asks for them before JAX starts), or set '
                   f'XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}.')


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _bytes(tree, fsdp: int, itemsize: int | None = None) -> int:
  """Bytes on one device of `tree` laid out by the rule table at `fsdp` ways."""
  return sum(math.prod(parallel.shard_shape(np.shape(x), fsdp)) * (itemsize or np.dtype(x.dtype).itemsize)
             for x in jax.tree.leaves(tree))


def _step_cost(step, state, args) -> tuple[float, int]:
  """(FLOPs, temporary bytes) per device of a jitted step compiled for abstract `state` and the step's other
  `args`."""
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
  no_remat: int = 0  # temporaries with config.model.remat='none' (reported when it is on)

  @property
  def total(self) -> int:
    return self.params + self.grads + self.optimizer + self.reference + self.temporaries


def _abstract_model(c, m, vocab):
  """(graphdef, abstract params) of the model `m` (a `config.model` section) for `vocab`."""
  graphdef, params = state_lib.split_model(
      nnx.eval_shape(lambda: build_model(m, vocab, seed=c.seed, lora_cfg=c.get('lora'))))
  return graphdef, _abstract(params)


def _step_costs(c, m, vocab, steps, mesh) -> list[tuple[float, int]]:
  """[(FLOPs, temporary bytes) per device] of each (optimizer, make_step, step arguments after the state) of `steps`
  on model `m`, compiled for `mesh`."""
  graphdef, params = _abstract_model(c, m, vocab)
  out = []
  for tx, make_step, args in steps:
    state = jax.eval_shape(lambda p, tx=tx: state_lib.init_state(p, tx, seed=c.seed), params)
    out.append(_step_cost(make_step(graphdef, tx, mesh), state, args))
  return out


def _compiled_costs(c, m, vocab, specs, mesh) -> list[tuple[float, int]]:
  """`_step_costs`; beyond 2 layers compiled at 1 and 2 layers and extended linearly to `n_layer` (every block costs
  the same), which keeps the dry run of a large model to a few small compilations."""
  if m.n_layer <= 2:
    return _step_costs(c, m, vocab, specs, mesh)
  one, two = (_step_costs(c, _with_layers(m, k), vocab, specs, mesh) for k in (1, 2))
  return [(f1 + (m.n_layer - 1) * (f2 - f1), t1 + (m.n_layer - 1) * (t2 - t1)) for (f1, t1), (f2, t2) in zip(one, two)]


def estimate(c, compile_steps: bool = True) -> tuple[str, int, list[StepMemory]]:
  """(a line describing the run, its number of parameters, the bootstrap and GRPO steps' `StepMemory`); without
  `compile_steps`, their temporaries and FLOPs are 0."""
  m, base = model_section(c)
  if compile_steps:
    request_devices(c.num_devices)
  num_devices = c.num_devices or jax.device_count()
  fsdp = c.get('parallel', {}).get('fsdp', 1)
  if fsdp < 1 or num_devices % fsdp:
    raise ValueError(f'config.parallel.fsdp={fsdp} must divide config.num_devices={num_devices}.')
  vocab = abstract_vocab(base)
  _, params = _abstract_model(c, m, vocab)
  param_itemsize = np.dtype(m.param_dtype).itemsize
  param_bytes = _bytes(params, fsdp, param_itemsize)
  train_modules = lora.configured_train_modules(c.get('lora'))
  trained = grads_lib.trained_filter(train_modules)
  trained_params = grads_lib.split_trained(params, trained)[0]

  b, g = c.bootstrap, c.grpo
  p, t = c.data.max_prompt_len, c.data.max_completion_len
  rows, completions = b.batch_size // num_devices, g.prompts_per_step * g.num_generations // num_devices
  cfg = grpo.GRPOConfig.from_config(g)
  for key, per_device, n in (('bootstrap.batch_size', rows, b.microbatches),
                             ('grpo.prompts_per_step', completions, cfg.microbatches)):
    if per_device < 1 or per_device % n:
      raise ValueError(f'config.{key}: {per_device} rows per device on {num_devices} devices, which its '
                       f'microbatches ({n}) must divide.')
  boot_batch = {k: jax.ShapeDtypeStruct((rows * num_devices, p if k.startswith('prompt') else t), jnp.int32)
                for k in bootstrap.BATCH_FIELDS}
  loss_cfg = bootstrap.LossConfig.from_config(b)
  boot_tx = dtt_method.bootstrap_optimizer(c)
  grpo_tx = grpo.make_grpo_optimizer(g, train_modules)
  specs = [(boot_tx, lambda gd, tx, mesh: bootstrap.make_train_step(gd, tx, loss_cfg, mesh, b.microbatches, trained),
            (boot_batch, jnp.float32(1.0))),  # the batch and the gate temperature tau
           (grpo_tx, lambda gd, tx, mesh: grpo.make_grpo_step(gd, tx, cfg, mesh, trained),
            (_rollout_batch(completions * num_devices, p, g.max_new_tokens, m.n_embd),))]
  costs, no_remat = [(0.0, 0)] * len(specs), [(0.0, 0)] * len(specs)
  if compile_steps:
    mesh = jax.make_mesh((num_devices // fsdp, fsdp), parallel.BATCH_AXES, devices=mesh_devices(num_devices),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    costs = _compiled_costs(c, m, vocab, specs, mesh)
    if m.get('remat', 'none') != 'none':
      no_remat = _compiled_costs(c, _with_layers(m, m.n_layer, remat='none'), vocab, specs, mesh)
  steps = []
  n_params = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
  tokens = (b.batch_size * (p + t), g.prompts_per_step * g.num_generations * (p + g.max_new_tokens) * cfg.mu)
  for (name, tx, reference, loops), (flops, temp), (_, temp0), n_tokens in zip(
      (('bootstrap', boot_tx, False, b.microbatches), ('grpo', grpo_tx, bool(cfg.beta), cfg.microbatches)), costs,
      no_remat, tokens):
    opt_state = jax.eval_shape(tx.init, params)
    steps.append(StepMemory(name, param_bytes, grads=_bytes(trained_params, fsdp, 4),
                            optimizer=_bytes(opt_state, fsdp),
                            reference=_bytes(trained_params, fsdp, param_itemsize) if reference else 0,
                            temporaries=temp, flops=flops * num_devices * loops, model_flops=6.0 * n_params * n_tokens,
                            no_remat=temp0))
  compact = ' (compact vocabulary: counted as the full one, an upper bound)' if c.model.vocab == 'compact' else ''
  kv = f' ({m.n_kv_head or m.n_head} kv)' if m.family != 'gpt2' else ''
  line = (f'{m.family}, {m.n_layer} layers, d={m.n_embd}, {m.n_head} heads{kv}, {vocab.num_rows} vocabulary '
          f'rows ({base} tokenizer ids + 4 specials){compact}; compute {m.dtype}, parameters {m.param_dtype}, '
          f'remat {m.get("remat", "none")}; {num_devices} devices as data={num_devices // fsdp} x fsdp={fsdp}. Per '
          f'device and step: bootstrap {rows} rows x {p}+{t} tokens in {b.microbatches} microbatches, GRPO '
          f'{completions} completions x {p}+{g.max_new_tokens} tokens in {cfg.microbatches} microbatches.')
  return line, n_params, steps


def _with_layers(m, n_layer: int, **changes):
  m = m.copy_and_resolve_references()
  m.n_layer = n_layer
  m.update(changes)
  return m


def report(c) -> str:
  """The dry run's report (see the module docstring)."""
  line, n_params, steps = estimate(c)
  gib = lambda x: f'{x / GIB:.2f}'
  remat = c.model.get('remat', 'none') != 'none'
  extra = ' | temporaries without remat' if remat else ''
  platform = mesh_devices(c.num_devices or jax.device_count())[0].platform
  lines = [f'Dry run ({platform}): {n_params / 1e6:.1f}M parameters, {line}', '',
           f'| step | params | grads | optimizer | GRPO reference | temporaries | total (GiB per device){extra} | '
           'TFLOPs per step: 6 N tokens | XLA (loops once) |', '|---|---|---|---|---|---|---|---|---|' + '---|' * remat]
  lines += [f'| {r.step} | {gib(r.params)} | {gib(r.grads)} | {gib(r.optimizer)} | {gib(r.reference)} | '
            f'{gib(r.temporaries)} | {gib(r.total)} |' + (f' {gib(r.no_remat)} |' if remat else '')
            + f' {r.model_flops / 1e12:.3g} | {r.flops / 1e12:.3g} |' for r in steps]
  return '\n'.join(lines)
def _rollout_batch(n: int, p: int, t: int, d: int) -> grpo.RolloutBatch:
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  return grpo.RolloutBatch(
      prompt=i32(n, p), prompt_mask=i32(n, p), completion=i32(n, t), completion_mask=i32(n, t), forced=i32(n, t),
      logprobs=f32(n, t), ref_logprobs=f32(n, t), gates=f32(n, t), gate_noise=f32(n, t), hidden_inputs=f32(n, t, d),
      inner_mask=f32(n, t), outer_mask=f32(n, t), tau=f32(n), rewards=f32(n),
      stats={name: f32(n) for name in rollout.STATS})
