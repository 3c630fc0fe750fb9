"""Tokens/s and MFU of generation and both training steps, GPT-2 small and a Qwen2.5-0.5B-shaped model, bf16 compute.

dtt_jax only (no reference side), on one device: the first of `jax.devices()`, an accelerator when there is one;
without one it runs on the CPU and says so. Random weights built from scratch by `dtt_jax.model.build_model`:

  gpt2_small   family 'gpt2', 12 layers, d 768, 12 heads, GPT-2's full vocabulary (50304 rows)
  qwen2_0p5b   family 'qwen2', 24 layers, d 896, 14 query / 2 key-value heads, SwiGLU 4864, RoPE theta 1e6, tied
               embeddings, 151936 rows (a vocabulary laid out like a Qwen2.5 checkpoint's tokenizer, eos 151643,
               the four DTT specials last, sized to the checkpoint's 151936 rows)

Compute dtype `--dtype` (bfloat16 by default; `config.model.dtype`), float32 parameters (`config.model.param_dtype`:
float32 master weights and optimizer state for training). For each model, with B = --batch, P = --prompt_len,
T = --new_tokens:

  generate   `engine.generate`: greedy, fixed length (early_stop=False), B prompts of P tokens, T new tokens.
             tokens/s = B * T / call time.
  bootstrap  one Stage-1 step, `bootstrap.make_train_step` (exact recurrent blend, fast unroll, fused output layer,
             AdamW): B rows of prompt P + completion T (`<bot> fillers <eot> answer <eos>`, every row full length).
             tokens/s = B * (P + T) / step time.
  grpo       one GRPO step, `grpo.make_grpo_step` (mu 1, beta 0.04, parallel re-score), on a RolloutBatch made from the
             generate measurement's own output (tokens, log-probs, gates, hidden states) with random rewards, B rows
             in groups of G = 4 (2 when B is not a multiple of 4), every completion position real; it continues
             from the bootstrap steps' train state (one copy of weights and AdamW state for both steps).
             tokens/s = B * (P + T) / step time.

Each is called once untimed (compilation), then --steps times; the figures use the median (`jax.block_until_ready`).

FLOPs per call. XLA's cost analysis of the lowered computation (`jax.jit(fn).lower(...).cost_analysis()['flops']`)
counts the body of a while loop (scan, fori_loop) once, whatever the trip count, on the backends checked so far
(CPU; the script probes it with a 10-step scan of a matmul at start and prints the result). All three computations
loop (over generated tokens, over the completion, over vocabulary tiles), so when the probe says loops are counted
once the figures use the model-FLOPs estimate and print XLA's number beside it; when it says they are counted in
full, they use XLA's. Estimate: a forward pass over S = P + T positions is
    F = 2 N S + 2 V D T + 4 L A S (S + 1) / 2
(N: the trunk's matmul weights, i.e. every weight matrix but the embedding / output tables; V D: the output table,
applied at the T completion positions; L layers, A = heads x head_dim, causal attention over the keys each query
sees). generate = F (prompt prefill + T decoding steps); a training step = 3 F (forward + backward; recomputation
not counted). The `FLOPs` column says which count a row uses.

Peak: the bf16 dense peak of the device from PEAK_FLOPS (matched on `device_kind`); on the CPU the best rate of a
2048^3 matmul in bfloat16 and in float32 measured in the same run, the larger of the two ("CPU: MFU against the
measured matmul peak"). An accelerator missing from the table gets MFU 'n/a' (add its peak to PEAK_FLOPS).

    python benchmarks/accelerator.py                  # B 32, P 128, T 128, 5 timed calls, both models
    python benchmarks/accelerator.py --quick          # B 4, P 16, T 16, 2 timed calls (CPU: 14.5 min on the loaded
                                                      # 2-core development machine, half of it compiling)
    python benchmarks/accelerator.py --models=qwen2_0p5b --batch=64 --measurements=generate,grpo

Output: the device, the FLOP-count probe, the peak, one block of detail lines per measurement, then a markdown table
model | measurement | batch x length | tokens/s | TFLOP/s | MFU | FLOPs. A measurement that raises is reported as
FAILED with its error (the others still run) and the script exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from configs import base  # pylint: disable=wrong-import-position
from dtt_jax import parallel, tokens  # pylint: disable=wrong-import-position
from dtt_jax.model import build_model  # pylint: disable=wrong-import-position
from dtt_jax.rl import grpo, rollout as rollout_lib  # pylint: disable=wrong-import-position
from dtt_jax.sampling import engine  # pylint: disable=wrong-import-position
from dtt_jax.sampling.sampler import SamplingConfig  # pylint: disable=wrong-import-position
from dtt_jax.train import bootstrap, state as state_lib  # pylint: disable=wrong-import-position

# config.model overrides of each model (the rest from configs/base.py)
MODELS = {
    'gpt2_small': dict(family='gpt2', n_layer=12, n_embd=768, n_head=12),
    'qwen2_0p5b': dict(family='qwen2', n_layer=24, n_embd=896, n_head=14, n_kv_head=2, intermediate_size=4864,
                       rope_theta=1e6, tie_word_embeddings=True),
}
QWEN_ROWS, QWEN_EOS = 151936, 151643

# Dense bf16 peak FLOP/s per chip, matched as a substring of device_kind.lower(), first match wins (specific first).
PEAK_FLOPS = (
    ('h100 pcie', 756e12), ('h100', 989e12), ('h200', 989e12), ('gh200', 989e12), ('a100', 312e12),
    ('tpu v4', 275e12), ('tpu v5 lite', 197e12), ('tpu v5e', 197e12), ('tpu v5p', 459e12), ('tpu v5', 459e12),
    ('tpu v6 lite', 918e12), ('tpu v6e', 918e12),
)
CPU_MATMUL = 2048  # side of the square matmuls that measure the CPU's peak
BETA, TAU = 0.04, 1.0


# --------------------------------------------------------------------------------------------- pure arithmetic


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one chip of `device_kind` (`jax.devices()[0].device_kind`); None if unknown."""
  kind = device_kind.lower()
  return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def forward_flops(matmul_params: int, output_rows: int, d: int, layers: int, attn_width: int, seq: int,
                  out_positions: int) -> float:
  """Model FLOPs of one forward pass of one sequence: trunk weights over `seq` positions, the output table at
  `out_positions`, causal attention (QK^T and AV over the keys each query sees)."""
  return (2.0 * matmul_params * seq + 2.0 * output_rows * d * out_positions
          + 4.0 * layers * attn_width * seq * (seq + 1) / 2)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
  return None if not peak else flops / seconds / peak


# --------------------------------------------------------------------------------------------- device and peaks


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def matmul_rate(dtype, n: int = CPU_MATMUL, repeats: int = 3) -> float:
  """Best FLOP/s of an n x n x n matmul in `dtype` (one compile, then `repeats` timed calls)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def xla_counts_loop_trips() -> bool:
  """Whether the backend's cost analysis multiplies a loop body by its trip count (a 10-step scan of a matmul
  against one matmul)."""
  a, w = jnp.ones((64, 128)), jnp.ones((128, 128))
  one = jax.jit(lambda a, w: a @ w).lower(a, w).cost_analysis()['flops']
  ten = jax.jit(lambda a, w: jax.lax.scan(lambda c, _: (c @ w, None), a, None, length=10)[0]).lower(a, w)
  return ten.cost_analysis()['flops'] > 5 * one


def xla_flops(fn, *args) -> float | None:
  """XLA's FLOP count of `fn(*args)` (lowered, not compiled: no second compilation); None if unavailable."""
  try:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])
  except Exception:  # pylint: disable=broad-except
    return None


# ------------------------------------------------------------------------------------------------------ models


def model_vocab(name: str) -> tokens.Vocab:
  """GPT-2's full vocabulary (50304 rows), or one laid out like a Qwen2.5 tokenizer's with QWEN_ROWS rows."""
  if name == 'gpt2_small':
    return tokens.Vocab.full()
  base_ids = QWEN_ROWS - len(tokens.SPECIAL_TOKENS)
  return tokens.Vocab(None, base=base_ids, eos_id=QWEN_EOS, reserved_ids=(QWEN_EOS,), copy_id=0,
                      checkpoint_ids=base_ids)


def build(name: str, dtype: str, max_len: int):
  """-> (DTTModel with random weights, its Vocab)."""
  vocab = model_vocab(name)
  m = base.get_config().model
  m.update(dict(MODELS[name], n_positions=max(1024, max_len), dtype=dtype, param_dtype='float32'))
  model = build_model(m, vocab)
  assert model.gpt2.cfg.vocab_rows == (50304 if name == 'gpt2_small' else QWEN_ROWS), model.gpt2.cfg.vocab_rows
  return model, vocab


def shape_counts(params, cfg) -> dict[str, int]:
  """Sizes for `forward_flops` from the parameter tree: matmul weights outside the embedding / output tables."""
  tables = ('wte', 'wpe', 'lm_head')
  matmul = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    names = {str(getattr(k, 'key', k)) for k in path}
    if x.ndim >= 2 and not names & set(tables):
      matmul += int(np.prod(x.shape))
  return dict(matmul_params=matmul, output_rows=cfg.vocab_rows, d=cfg.n_embd, layers=cfg.n_layer,
              attn_width=cfg.n_head * cfg.head_dim)


# ------------------------------------------------------------------------------------------------------ inputs


def prompts(batch: int, prompt_len: int, vocab: tokens.Vocab, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """[B,P] random text ids, every position real."""
  text = vocab.text_ids()
  ids = text[np.random.RandomState(seed).randint(0, text.size, (batch, prompt_len))]
  return ids.astype(np.int32), np.ones((batch, prompt_len), np.int32)


def stage1_batch(batch: int, prompt_len: int, completion_len: int, vocab: tokens.Vocab) -> dict[str, np.ndarray]:
  """Full-length rows: prompt of P text ids; completion `<bot> fillers <eot> answer <eos>` of exactly T tokens,
  fillers (up to T/4) in every other row (inner and filler positions, outside the CE loss)."""
  rng = np.random.RandomState(1)
  text = vocab.text_ids()
  prompt, prompt_mask = prompts(batch, prompt_len, vocab, seed=1)
  t = completion_len
  out = {k: np.zeros((batch, t), np.int32) for k in bootstrap.BATCH_FIELDS if not k.startswith('prompt')}
  out.update(prompt=prompt, prompt_mask=prompt_mask)
  for i in range(batch):
    n_fill = rng.randint(1, max(2, t // 4)) if i % 2 and t >= 4 else 0
    answer = text[rng.randint(0, text.size, max(0, t - n_fill - 3))]
    seq = np.array([vocab.bot, *text[rng.randint(0, text.size, n_fill)], vocab.eot, *answer, vocab.eos])[:t]
    out['completion'][i] = seq
    out['completion_mask'][i] = 1
    out['inner_mask'][i, 1:1 + n_fill] = 1
    out['filler_mask'][i, 1:1 + n_fill] = 1
    out['outer_mask'][i] = 1 - out['inner_mask'][i]
    out['loss_mask'][i] = 1 - out['filler_mask'][i]
  return out


def rollout_batch(out: engine.Rollout, prompt, prompt_mask, group: int) -> grpo.RolloutBatch:
  """The generate measurement's output -> a host RolloutBatch: every completion position real, the first quarter
  inside the reasoning span, rewards N(0, 1) (every group has a spread), reference log-probs near the rollout's."""
  out = jax.device_get(out)
  n, t = out.tokens.shape
  rng = np.random.RandomState(2)
  mask = np.ones((n, t), np.int32)
  inner = np.zeros((n, t), np.float32)
  inner[:, 1:max(1, t // 4)] = 1
  logprobs = np.asarray(out.logprobs, np.float32)
  rewards = rng.randn(n).astype(np.float32)
  assert n % group == 0
  return grpo.RolloutBatch(
      prompt=prompt, prompt_mask=prompt_mask, completion=out.tokens, completion_mask=mask, forced=out.forced,
      logprobs=logprobs, ref_logprobs=logprobs + 0.01 * rng.randn(n, t).astype(np.float32), gates=out.gates,
      gate_noise=out.gate_noise, hidden_inputs=out.hidden_inputs, inner_mask=inner, outer_mask=1 - inner,
      tau=np.full((n,), TAU, np.float32), rewards=rewards, stats={'accuracy': (rewards > 0).astype(np.float32)})


# ------------------------------------------------------------------------------------------------ measurements


def timed(call, steps: int) -> tuple[float, list[float]]:
  """call() (returns something to block on) once untimed, then `steps` times -> (first call s, timed s)."""
  t = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t)
  return first, times


def measure_generate(model, vocab, args):
  """-> (first s, times, xla flops, host prompt/mask, the last Rollout)."""
  cfg = engine.GenerateConfig(max_new_tokens=args.new_tokens, eos_id=vocab.eos, bot_id=vocab.bot, eot_id=vocab.eot,
                              sampling=SamplingConfig(greedy=True), early_stop=False, return_hidden=True)
  prompt, mask = prompts(args.batch, args.prompt_len, vocab)
  p, m, key, tau = jnp.asarray(prompt), jnp.asarray(mask), jax.random.key(0), jnp.float32(TAU)
  result = {}

  def call():
    result['out'] = engine.generate(model, p, m, key, tau, cfg)
    return result['out'].tokens

  first, times = timed(call, args.steps)
  graphdef, state = nnx.split(model)
  flops = xla_flops(lambda s, p, m, k, t: engine.generate_traced(nnx.merge(graphdef, s), p, m, k, t, cfg, False).tokens,
                    state, p, m, key, tau)
  return first, times, flops, (prompt, mask), result['out']


def measure_step(step_fn, holder: dict, batch, steps: int, *extra):
  """A train step that donates its state, `holder['state']` (replaced by each call's new state), on a sharded batch
  -> (first s, times, xla flops)."""
  flops = xla_flops(step_fn, holder['state'], batch, *extra)

  def call():
    holder['state'], metrics = step_fn(holder['state'], batch, *extra)
    return holder['state'], metrics

  first, times = timed(call, steps)
  return first, times, flops


def run_model(name: str, args, peak, loops_counted: bool) -> list[dict]:
  print(f'\n## {name}')
  total = args.prompt_len + args.new_tokens
  model, vocab = build(name, args.dtype, total)
  graphdef, params = state_lib.split_model(model)
  counts = shape_counts(params, model.gpt2.cfg)
  print(f'  {counts["matmul_params"] / 1e6:.1f}M trunk matmul weights, {model.gpt2.cfg.vocab_rows} x '
        f'{counts["d"]} output table, {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M parameters, '
        f'compute {model.gpt2.cfg.dtype}, parameters {model.gpt2.cfg.param_dtype}')
  fwd = forward_flops(**counts, seq=total, out_positions=args.new_tokens)  # one sequence
  mesh = parallel.make_mesh(1)
  tx = state_lib.make_optimizer(1e-5, 1000, 0, 0.01, 1.0)
  group = 4 if args.batch % 4 == 0 else 2
  rows, rollout = [], None
  shape = f'{args.batch} x {args.prompt_len}+{args.new_tokens}'

  def record(kind, n_tokens, estimate, fn):
    print(f'  {kind}:')
    try:
      first, times, xla = fn()
    except Exception as e:  # pylint: disable=broad-except
      msg = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]
      print(f'    FAILED {msg}')
      traceback.print_exc(limit=-3)
      rows.append(dict(model=name, kind=kind, shape=shape, failed=msg))
      return
    med = statistics.median(times)
    use_xla = loops_counted and xla is not None
    flops = xla if use_xla else estimate
    xla_txt = 'n/a' if xla is None else f'{xla:.3e}' + ('' if loops_counted else ' (loop bodies counted once)')
    print(f'    first call (compile) {first:.1f} s; {len(times)} calls: median {med * 1e3:.1f} ms, best '
          f'{min(times) * 1e3:.1f}, worst {max(times) * 1e3:.1f}')
    print(f'    FLOPs per call: estimate {estimate:.3e}, XLA {xla_txt}')
    rows.append(dict(model=name, kind=kind, shape=shape, tok_s=n_tokens / med, tflops=flops / med / 1e12,
                     mfu=mfu(flops, med, peak), source='XLA' if use_xla else 'estimate'))

  def gen():
    nonlocal rollout
    first, times, xla, host_prompt, out = measure_generate(model, vocab, args)
    rollout = (out, host_prompt)
    return first, times, xla

  record('generate', args.batch * args.new_tokens, args.batch * fwd, gen)
  # One train state for both steps (GRPO continues from the bootstrap steps' parameters): its parameters are the
  # model's arrays, donated by the first step, so one copy of the weights and one of the optimizer state exist.
  holder = {'state': parallel.replicate(state_lib.init_state(params, tx, seed=0), mesh)}
  model = params = None
  if 'bootstrap' in args.measurements:
    step = bootstrap.make_train_step(graphdef, tx, bootstrap.LossConfig(), mesh)
    batch = parallel.shard_batch(stage1_batch(args.batch, args.prompt_len, args.new_tokens, vocab), mesh)
    record('bootstrap step', args.batch * total, 3 * args.batch * fwd,
           lambda: measure_step(step, holder, batch, args.steps, jnp.float32(TAU)))
  if 'grpo' in args.measurements:
    cfg = grpo.GRPOConfig(num_generations=group, beta=BETA, max_new_tokens=args.new_tokens, max_think=0)
    step = grpo.make_grpo_step(graphdef, tx, cfg, mesh)

    def grpo_call():
      if rollout is None:
        raise RuntimeError('no rollout: the generate measurement failed')
      out, (prompt, mask) = rollout
      batch = rollout_lib.shard_rollout(rollout_batch(out, prompt, mask, group), mesh, group)
      return measure_step(step, holder, batch, args.steps)

    record(f'grpo step (G={group})', args.batch * total, 3 * args.batch * fwd, grpo_call)
  return rows


def table(rows: list[dict]) -> str:
  lines = ['| model | measurement | batch x length | tokens/s | TFLOP/s | MFU | FLOPs |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    if 'failed' in r:
      lines.append(f'| {r["model"]} | {r["kind"]} | {r["shape"]} | FAILED: {r["failed"]} | | | |')
      continue
    m = 'n/a' if r['mfu'] is None else f'{100 * r["mfu"]:.2f}%'
    lines.append(f'| {r["model"]} | {r["kind"]} | {r["shape"]} | {r["tok_s"]:.1f} | {r["tflops"]:.4f} | {m} | '
                 f'{r["source"]} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--models', default=','.join(MODELS), help=f'comma-separated, of {", ".join(MODELS)}')
  parser.add_argument('--batch', type=int, default=32, help='rows (GRPO: groups of 4, or 2 when B % 4 != 0)')
  parser.add_argument('--prompt_len', type=int, default=128)
  parser.add_argument('--new_tokens', type=int, default=128, help='generated tokens = training completion length')
  parser.add_argument('--steps', type=int, default=5, help='timed calls per measurement (after one untimed)')
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'), help='compute dtype')
  parser.add_argument('--measurements', default='generate,bootstrap,grpo',
                      help='generate always runs (GRPO trains on its output); bootstrap, grpo optional')
  parser.add_argument('--quick', action='store_true', help='B 4, P 16, T 16, 2 timed calls (for a CPU run)')
  args = parser.parse_args()
  if args.quick:
    args.batch, args.prompt_len, args.new_tokens, args.steps = 4, 16, 16, 2
  names = [n.strip() for n in args.models.split(',') if n.strip()]
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    parser.error(f'--models: unknown {", ".join(unknown)}; expected any of {", ".join(MODELS)}')
  measurements = {m.strip() for m in args.measurements.split(',') if m.strip()}
  if not measurements <= {'generate', 'bootstrap', 'grpo'}:
    parser.error(f'--measurements={args.measurements}: expected any of generate, bootstrap, grpo')
  args.measurements = measurements
  if args.batch % 2:
    parser.error(f'--batch={args.batch}: GRPO needs groups of 2 or 4 rows; give an even batch')

  dev = jax.devices()[0]
  print(f'device: {dev} ({dev.device_kind}), {jax.device_count()} device(s) visible, measuring on 1; '
        f'jax {jax.__version__}')
  if dev.platform == 'cpu':
    print(f'No accelerator: running on CPU; figures are CPU figures ({cpu_name()}, {os.cpu_count()} cores, '
          f'load average {", ".join(f"{x:.1f}" for x in os.getloadavg())})')
    bf16, fp32 = matmul_rate(jnp.bfloat16), matmul_rate(jnp.float32)
    peak = max(bf16, fp32)
    print(f'CPU: MFU against the measured matmul peak: {CPU_MATMUL}^3 matmul best bf16 {bf16 / 1e9:.1f} GFLOP/s, '
          f'fp32 {fp32 / 1e9:.1f} GFLOP/s; peak = {peak / 1e9:.1f} GFLOP/s')
  else:
    peak = peak_flops(dev.device_kind)
    print(f'peak: {"unknown (add it to PEAK_FLOPS); MFU n/a" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"} '
          f'(dense bf16, one chip)')
  loops_counted = xla_counts_loop_trips()
  print('XLA cost analysis ' + ('multiplies loop bodies by their trip count: FLOPs from XLA' if loops_counted else
                                'counts each loop body once: FLOPs from the model estimate (XLA printed beside it)'))
  print(f'batch {args.batch}, prompt {args.prompt_len}, new tokens / completion {args.new_tokens}, '
        f'{args.steps} timed calls (median), compute {args.dtype}')
  rows = []
  for name in names:
    rows += run_model(name, args, peak, loops_counted)
  print()
  if dev.platform == 'cpu':
    print(f'peak host memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB')
  print(table(rows))
  if any('failed' in r for r in rows):
    sys.exit(1)


if __name__ == '__main__':
  main()
