"""Stage-1 (bootstrap) training throughput: dtt_jax's train step vs a PyTorch HF training loop doing the same loss.

Both sides: the same weights (the JAX DTTModel's GPT-2 is exported and loaded by `GPT2LMHeadModel`, the gate head
copied into a torch Linear), the same batch, CPU, fp32, and the same loss (SPEC §5):

    prefill of the left-padded prompt (its keys/values kept: `past_key_values` in PyTorch, the KV cache in JAX), then
    a teacher-forced loop over the completion: x_t = g_t * h_{t-1} + (1 - g_t) * wte(y_t),
    g_t = sigmoid((w . h_{t-1} + b + n_t) / tau) with logistic noise n_t (Gumbel-sigmoid);
    loss = CE(completion targets on loss_mask) + lambda * (hinge of inner gates above m_in + outer gates below m_out);
    attention logits of filler keys get log(0.3) (noisy span); backward through the whole recurrence;
    global-norm clipping, AdamW (decay on matrices only) with warmup + cosine schedule.

The PyTorch side is written to do no needless work: one embedding gather for the whole completion, the last
completion position is not run through the trunk (its hidden state feeds no loss), the output layer is applied only
at loss positions and only to the real vocabulary rows (padded rows are masked in dtt_jax, so the two softmaxes
are equal), fused AdamW. Before timing, the script checks that both sides give the same loss and gradient norm for
the same gate noise.

    python benchmarks/sft.py            # tiny (4 layers, d=256, 4 heads), vocab 512 and 50304, completion 32 and 96
    python benchmarks/sft.py --quick    # main configuration only (tiny, vocab 50304, completion 32)

Tokens/s counts every prompt + completion position of the batch (padding included) per second of training step.
Each line gives the best and the median of interleaved steps after a warm-up step (which includes JAX compilation).
The machine is shared: other processes only ever add time, so the ratios use the best step of each side (the
median ratio is printed beside it), and the CPU pressure (/proc/pressure/cpu) is printed before and after.
Last line: `speedup: <ratio>` = PyTorch best step time / dtt_jax best step time for the main configuration
(tiny, 50304 rows, B16, prompt 32 + completion 32, exact recurrent loss).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from dtt_jax import parallel  # pylint: disable=wrong-import-position
from dtt_jax.model import hf_io  # pylint: disable=wrong-import-position
from dtt_jax.model.dtt import DTTConfig, DTTModel  # pylint: disable=wrong-import-position
from dtt_jax.model.gpt2 import NEG_INF, GPT2Config  # pylint: disable=wrong-import-position
from dtt_jax.train import bootstrap, state as state_lib  # pylint: disable=wrong-import-position

BATCH = 16
PROMPT = 32
TAU = 1.0
LOSS = bootstrap.LossConfig()  # hinge_lambda 0.1, m_in 0.9, m_out 0.1, noisy_span_scale 0.3, gate noise on
OPT = dict(lr=1e-3, steps=1000, warmup_steps=50, weight_decay=0.01, grad_clip=1.0)
TINY = dict(n_layer=4, n_embd=256, n_head=4)
VOCABS = {512: 500, 50304: 50261}  # embedding rows -> real rows (compact vocabulary: 500 ids padded to 512)
EOS, BOT, EOT = 0, 1, 2  # compact-vocabulary ids of the specials (any in-range ids would do)


def build(vocab_rows: int) -> DTTModel:
  cfg = GPT2Config(vocab_rows=vocab_rows, num_tokens=VOCABS[vocab_rows], n_positions=1024, **TINY)
  model = DTTModel(DTTConfig(cfg, gate_bias_init=0.0), rngs=nnx.Rngs(0))
  model.gate_head.kernel[...] = 0.05 * jax.random.normal(jax.random.key(1), (cfg.n_embd, 1))
  return model


def make_batch(num_tokens: int, completion_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Left-padded prompts of 16..32 tokens, completions `<bot> [fillers] <eot> answer <eos>` of T/2..T tokens
  (row 0 fills all T columns, so no trailing column is all padding), fillers (1..8) in every other row."""
  rng = np.random.RandomState(seed)
  p, t = PROMPT, completion_len
  batch = {k: np.zeros((BATCH, p if k.startswith('prompt') else t), np.int32) for k in bootstrap.BATCH_FIELDS}
  for i in range(BATCH):
    n_prompt = p if i == 0 else rng.randint(p // 2, p + 1)
    batch['prompt'][i, p - n_prompt:] = rng.randint(5, num_tokens, n_prompt)
    batch['prompt_mask'][i, p - n_prompt:] = 1
    n = t if i == 0 else rng.randint(t // 2, t + 1)
    n_fill = rng.randint(1, 9) if i % 2 else 0
    seq = [BOT] + list(rng.randint(5, num_tokens, n_fill)) + [EOT] + list(rng.randint(5, num_tokens, n - n_fill - 3))
    seq.append(EOS)
    batch['completion'][i, :n] = seq
    batch['completion'][i, n:] = EOS
    batch['completion_mask'][i, :n] = 1
    batch['inner_mask'][i, 1:1 + n_fill] = 1
    batch['filler_mask'][i, 1:1 + n_fill] = 1
    batch['outer_mask'][i] = batch['completion_mask'][i] - batch['inner_mask'][i]
    batch['loss_mask'][i] = batch['completion_mask'][i] - batch['filler_mask'][i]
  return batch


# ----------------------------------------------------------------------------------------------------------- JAX


class JaxSide:

  def __init__(self, model: DTTModel):
    self.mesh = parallel.make_mesh()
    graphdef, params = state_lib.split_model(model)
    self.graphdef = graphdef
    self.tx = state_lib.make_optimizer(OPT['lr'], OPT['steps'], OPT['warmup_steps'], OPT['weight_decay'],
                                       OPT['grad_clip'])
    self.state = parallel.replicate(state_lib.init_state(jax.device_get(params), self.tx, seed=0), self.mesh)
    self.step_fn = bootstrap.make_train_step(graphdef, self.tx, LOSS, self.mesh)
    self.tau = jnp.float32(TAU)

  def step(self, batch):
    self.state, metrics = self.step_fn(self.state, batch, self.tau)
    jax.block_until_ready((self.state, metrics))
    return metrics

  def loss_and_grad_norm(self, batch, noise):
    """Loss and global gradient norm at the current params for given gate noise [B,T] (the check)."""
    def f(params):
      return bootstrap.loss_terms(nnx.merge(self.graphdef, params), batch, noise, TAU, LOSS,
                                  bootstrap._counts(batch))[0]  # pylint: disable=protected-access
    loss, grads = jax.jit(jax.value_and_grad(f))(self.state.params)
    return float(loss), float(optax.global_norm(grads))


# ------------------------------------------------------------------------------------------------------- PyTorch


class TorchSide:
  """HF GPT2LMHeadModel + a torch Linear gate head, trained with the exact recurrent loss."""

  def __init__(self, model: DTTModel, hf_dir: str, batch: dict[str, np.ndarray]):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    transformers.logging.set_verbosity_error()  # the exported config's bos/eos ids lie outside a compact vocabulary
    transformers.logging.disable_progress_bar()
    self.torch = torch
    self.hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    self.hf.train()  # dropout is 0 in the exported config
    d = model.gpt2.cfg.n_embd
    self.num_tokens = model.gpt2.cfg.num_tokens
    self.gate = torch.nn.Linear(d, 1)
    with torch.no_grad():
      self.gate.weight.copy_(torch.tensor(np.asarray(model.gate_head.kernel[...]).T))
      self.gate.bias.copy_(torch.tensor(np.asarray(model.gate_head.bias[...])))
    self.wte = self.hf.transformer.wte
    params = {n: p for n, p in self.hf.named_parameters()} | {f'gate.{n}': p for n, p in self.gate.named_parameters()}
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=OPT['weight_decay']), dict(params=no_decay, weight_decay=0.0)]
    try:
      self.opt = torch.optim.AdamW(groups, lr=OPT['lr'], fused=True)
      self.opt_kind = 'fused'
    except (RuntimeError, TypeError):
      self.opt = torch.optim.AdamW(groups, lr=OPT['lr'], foreach=True)
      self.opt_kind = 'foreach'
    warm, total = OPT['warmup_steps'], OPT['steps']

    def schedule(i):  # optax.warmup_cosine_decay_schedule(0, lr, warm, total, end_value=0.1 * lr) / lr
      if i < warm:
        return i / warm
      return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i - warm, total - warm) / (total - warm)))

    self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
    self.params = list(params.values())
    self.b = {k: torch.tensor(v, dtype=torch.long if k in ('prompt', 'completion') else torch.float32)
              for k, v in batch.items()}

  def _masks(self):
    """-> prefill mask [B,1,P,P], per-key bias [B,1,1,P+T], prompt positions [B,P], completion positions [B,T]."""
    torch, b = self.torch, self.b
    p, t = b['prompt'].shape[1], b['completion'].shape[1]
    key_bias = torch.cat([torch.where(b['prompt_mask'] > 0, 0.0, NEG_INF),
                          torch.where(b['filler_mask'] > 0, math.log(LOSS.noisy_span_scale), 0.0)], 1)
    causal = torch.tril(torch.ones(p, p, dtype=torch.bool))
    prefill = torch.where(causal, 0.0, NEG_INF)[None] + key_bias[:, None, :p]
    num_real = b['prompt_mask'].sum(1).long()
    prompt_pos = (b['prompt_mask'].long().cumsum(1) - 1).clamp(min=0)
    completion_pos = num_real[:, None] + torch.arange(t)[None]
    return prefill[:, None], key_bias[:, None, None], prompt_pos, completion_pos

  def loss(self, noise):
    """noise [B,T] logistic gate noise -> (loss, metrics) with the exact recurrent blend."""
    torch, b, tr = self.torch, self.b, self.hf.transformer
    t_len = b['completion'].shape[1]
    p = b['prompt'].shape[1]
    prefill_mask, key_bias, prompt_pos, completion_pos = self._masks()
    out = tr(input_ids=b['prompt'], attention_mask=prefill_mask, position_ids=prompt_pos, use_cache=True)
    past, h = out.past_key_values, out.last_hidden_state[:, -1]
    emb = self.wte(b['completion'])  # [B,T,D], one gather
    target_h, gates = [h], []
    for t in range(t_len):
      g = torch.sigmoid((self.gate(h)[:, 0] + noise[:, t]) / TAU)
      gates.append(g)
      if t == t_len - 1:  # h_{T-1} predicts nothing and its gate is already taken: skip the last trunk pass
        break
      x = g[:, None] * h + (1 - g[:, None]) * emb[:, t]
      out = tr(inputs_embeds=x[:, None], past_key_values=past, attention_mask=key_bias[..., :p + t + 1],
               position_ids=completion_pos[:, t:t + 1], use_cache=True)
      past, h = out.past_key_values, out.last_hidden_state[:, 0]
      target_h.append(h)
    hidden = torch.stack(target_h, 1)  # [B,T,D] h_{t-1}
    gates = torch.stack(gates, 1)  # [B,T]
    sel = b['loss_mask'] > 0
    logits = torch.nn.functional.linear(hidden[sel], self.wte.weight[:self.num_tokens])  # [N_loss, V_real]
    targets = b['completion'][sel]
    n_loss = sel.sum().clamp(min=1)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction='sum') / n_loss
    inner, outer = b['inner_mask'], b['outer_mask']
    hinge = ((torch.relu(LOSS.m_in - gates) * inner).sum() / inner.sum().clamp(min=1)
             + (torch.relu(gates - LOSS.m_out) * outer).sum() / outer.sum().clamp(min=1))
    loss = ce + LOSS.hinge_lambda * hinge
    with torch.no_grad():
      metrics = dict(loss=loss.detach(), ce=ce.detach(), hinge=hinge.detach(),
                     gate_inner=(gates * inner).sum() / inner.sum().clamp(min=1),
                     gate_outer=(gates * outer).sum() / outer.sum().clamp(min=1),
                     token_accuracy=(logits.argmax(-1) == targets).sum() / n_loss)
    return loss, metrics

  def parallel_loss(self):
    """No-latent variant (gate off): one forward over prompt + completion, CE on loss positions."""
    torch, b, tr = self.torch, self.b, self.hf.transformer
    p = b['prompt'].shape[1]
    t_len = b['completion'].shape[1]
    _, key_bias, prompt_pos, completion_pos = self._masks()
    s = p + t_len
    causal = torch.where(torch.tril(torch.ones(s, s, dtype=torch.bool)), 0.0, NEG_INF)
    mask = (causal[None] + key_bias[:, 0])[:, None]  # [B,1,S,S]
    ids = torch.cat([b['prompt'], b['completion']], 1)
    out = tr(input_ids=ids, attention_mask=mask, position_ids=torch.cat([prompt_pos, completion_pos], 1))
    hidden = out.last_hidden_state[:, p - 1:s - 1]
    sel = b['loss_mask'] > 0
    logits = torch.nn.functional.linear(hidden[sel], self.wte.weight[:self.num_tokens])
    return torch.nn.functional.cross_entropy(logits, b['completion'][sel])

  def _update(self, loss):
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = self.torch.nn.utils.clip_grad_norm_(self.params, OPT['grad_clip'], foreach=True)
    self.opt.step()
    self.sched.step()
    return grad_norm

  def step(self):
    u = self.torch.rand(self.b['completion'].shape).clamp_(1e-6, 1 - 1e-6)
    loss, metrics = self.loss(u.log() - (-u).log1p())
    metrics['grad_norm'] = self._update(loss)
    return metrics

  def parallel_step(self):
    return self._update(self.parallel_loss())

  def loss_and_grad_norm(self, noise: np.ndarray):
    loss, _ = self.loss(self.torch.tensor(noise))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = self.torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.params if p.grad is not None))
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach()), float(norm)


# -------------------------------------------------------------------------------------------------------- driver


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def cpu_pressure() -> str:
  try:
    with open('/proc/pressure/cpu') as f:
      return f.readline().strip()
  except OSError:
    return 'n/a'


def run_config(vocab_rows: int, completion_len: int, repeats: int, check: bool) -> float:
  """Times both sides on one shape; prints a block of lines; returns the best-step-time ratio torch/jax."""
  model = build(vocab_rows)
  batch = make_batch(VOCABS[vocab_rows], completion_len)
  with tempfile.TemporaryDirectory() as hf_dir:
    hf_io.export_pretrained(model.gpt2, hf_dir, num_tokens=model.gpt2.cfg.vocab_rows)
    pt = TorchSide(model, hf_dir, batch)
  jx = JaxSide(model)
  jbatch = parallel.shard_batch(batch, jx.mesh)
  if check:  # same loss and gradient for the same noise, at the shared initial weights
    noise = np.random.RandomState(1).logistic(size=batch['completion'].shape).astype(np.float32)
    lj, gj = jx.loss_and_grad_norm(jbatch, jnp.asarray(noise))
    lt, gt = pt.loss_and_grad_norm(noise)
    ok = abs(lj - lt) <= 1e-4 * abs(lt) and abs(gj - gt) <= 1e-3 * gt
    print(f'  check: loss jax {lj:.6f} torch {lt:.6f}; grad norm jax {gj:.6f} torch {gt:.6f}  '
          f'{"OK" if ok else "MISMATCH"}')
    if not ok:
      raise SystemExit('the two sides do not compute the same loss')
  t_compile = timed(lambda: jx.step(jbatch))
  pt.step()  # warm-up
  pt.parallel_step()
  times = {'jax': [], 'torch': [], 'parallel': []}
  for _ in range(repeats):  # interleaved, so load changes on the shared machine hit both sides alike
    times['jax'].append(timed(lambda: jx.step(jbatch)))
    times['torch'].append(timed(pt.step))
    times['parallel'].append(timed(pt.parallel_step))
  n_tok = BATCH * (PROMPT + completion_len)
  med = {k: float(np.median(v)) for k, v in times.items()}
  best = {k: min(v) for k, v in times.items()}
  name = f'tiny V={vocab_rows:<5d} B{BATCH} P{PROMPT}+T{completion_len}'
  loss_frac = batch['loss_mask'].mean()
  print(f'{name}  (loss positions {loss_frac:.0%} of completion; jax first step incl. compile {t_compile:.1f} s)')
  for k, label in (('jax', 'dtt_jax train step      '), ('torch', 'pytorch recurrent loop   '),
                   ('parallel', 'pytorch parallel, no gate')):
    print(f'  {label} {n_tok / best[k]:8.0f} tok/s  best {best[k] * 1e3:7.1f} ms  median {med[k] * 1e3:7.1f} ms  '
          f'worst {max(times[k]) * 1e3:7.1f} ms ({len(times[k])} steps)')
  ratio = best['torch'] / best['jax']
  print(f'  ratio pytorch/dtt_jax step time: best {ratio:.2f}  median {med["torch"] / med["jax"]:.2f}')
  return ratio


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='main configuration only')
  parser.add_argument('--repeats', type=int, default=5, help='timed steps per side and configuration')
  parser.add_argument('--no-check', action='store_true', help='skip the loss/gradient equality check')
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  print(f'devices: jax {jax.devices()} (cpu cores {os.cpu_count()}), torch {torch.__version__} '
        f'threads={torch.get_num_threads()}, fp32')
  print(f'cpu pressure before: {cpu_pressure()}')
  configs = [(50304, 32)] if args.quick else [(512, 32), (50304, 32), (50304, 96)]
  ratios = {}
  for vocab_rows, completion_len in configs:
    ratios[(vocab_rows, completion_len)] = run_config(vocab_rows, completion_len, args.repeats,
                                                      check=not args.no_check)
  after = cpu_pressure()
  print(f'cpu pressure after: {after}')
  busy = [float(x.split('=')[1]) for x in after.split() if x.startswith('avg60=')]
  if busy and busy[0] > 20:
    print(f'WARNING: other processes held the CPU (avg60={busy[0]:.0f}%); PyTorch\'s eager loop slows down far more '
          'than XLA under contention, so these ratios overstate the speedup: rerun on a quiet machine.')
  print('ratios (pytorch / dtt_jax best step time; target >= 1.5): '
        + '  '.join(f'V={v} T={t}: {r:.2f}' for (v, t), r in ratios.items()))
  print(f'speedup: {ratios[(50304, 32)]:.2f}')


if __name__ == '__main__':
  main()
