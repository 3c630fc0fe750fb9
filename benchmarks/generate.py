"""DTT generation throughput: dtt_jax's engine vs a PyTorch eager loop on HF GPT2LMHeadModel doing the same work.

Both sides: same weights (the JAX model is exported and loaded by HF), same batch, prompt of 32 tokens, 128 new
tokens, temperature sampling over the full padded GPT-2 vocabulary (50304 rows), the Gumbel-sigmoid gate with noise
blending the previous hidden state into every next input, a KV cache, fixed length (no early stop), CPU, fp32.
dtt_jax's output layer multiplies by a [D, V] copy of the tied wte that `engine.generate` makes on CPU once per
weights array and keeps between calls (`GenerateConfig.transposed_output`; made in the untimed first call here);
PyTorch's lm_head multiplies by the [V, D] table itself.

    python benchmarks/generate.py            # tiny (4 layers, d=256) and GPT-2 small, batches 8 and 64
    python benchmarks/generate.py --quick    # tiny only, fewer tokens

Last line: `speedup: tiny=<ratio> small=<ratio>`, each the smaller ratio over the two batch sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from dtt_jax.model import hf_io  # pylint: disable=wrong-import-position
from dtt_jax.model.dtt import DTTConfig, DTTModel  # pylint: disable=wrong-import-position
from dtt_jax.model.gpt2 import GPT2Config  # pylint: disable=wrong-import-position
from dtt_jax.sampling import engine  # pylint: disable=wrong-import-position
from dtt_jax.sampling.sampler import SamplingConfig  # pylint: disable=wrong-import-position

PROMPT = 32
TAU = 1.0
SHAPES = {
    'tiny': dict(n_layer=4, n_embd=256, n_head=4),
    'small': dict(n_layer=12, n_embd=768, n_head=12),
}


def build(shape: str) -> DTTModel:
  cfg = GPT2Config(vocab_rows=50304, num_tokens=50261, n_positions=1024, **SHAPES[shape])
  model = DTTModel(DTTConfig(cfg, gate_bias_init=0.0), rngs=nnx.Rngs(0))
  model.gate_head.kernel.value = 0.05 * jax.random.normal(jax.random.key(1), (cfg.n_embd, 1))
  return model


def flops_per_token(cfg: GPT2Config, context: float) -> float:
  """Forward FLOPs of one generated token: weight matmuls, output layer, attention over `context` keys."""
  d, layers = cfg.n_embd, cfg.n_layer
  return 2 * layers * 12 * d * d + 2 * cfg.vocab_rows * d + 4 * layers * d * context


def best_matmul_gflops() -> float:
  a = jax.random.normal(jax.random.key(0), (2048, 768))
  b = jax.random.normal(jax.random.key(1), (768, 3072))
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = 0.0
  for _ in range(5):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = max(best, 2 * 2048 * 768 * 3072 / (time.perf_counter() - t) / 1e9)
  return best


def jax_generate_fn(model: DTTModel, batch: int, new_tokens: int):
  cfg = engine.GenerateConfig(max_new_tokens=new_tokens, sampling=SamplingConfig(temperature=1.0), gate_noise=True,
                              early_stop=False, return_hidden=True, segment=64)
  prompt = jnp.asarray(np.random.RandomState(0).randint(0, 50257, (batch, PROMPT)), jnp.int32)
  mask = jnp.ones_like(prompt)
  key = jax.random.key(0, impl='unsafe_rbg')

  def run():
    out = engine.generate(model, prompt, mask, key, TAU, cfg)
    return out.tokens.block_until_ready()

  return run


def torch_generate_fn(model: DTTModel, batch: int, new_tokens: int, torch_dir: str):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf = transformers.GPT2LMHeadModel.from_pretrained(torch_dir).eval()
  gate_w = torch.tensor(np.asarray(model.gate_head.kernel.value)[:, 0])
  gate_b = float(np.asarray(model.gate_head.bias.value)[0])
  prompt = torch.tensor(np.random.RandomState(0).randint(0, 50257, (batch, PROMPT)))
  wte = hf.transformer.wte

  @torch.no_grad()
  def run():
    mask = torch.ones(batch, PROMPT, dtype=torch.long)
    out = hf.transformer(input_ids=prompt, attention_mask=mask, use_cache=True)
    past, h = out.past_key_values, out.last_hidden_state[:, -1]
    tokens = []
    for t in range(new_tokens):
      probs = torch.softmax(hf.lm_head(h), dim=-1)
      tok = torch.multinomial(probs, 1)[:, 0]
      u = torch.rand(batch).clamp(1e-6, 1 - 1e-6)
      g = torch.sigmoid((h @ gate_w + gate_b + torch.log(u) - torch.log1p(-u)) / TAU)[:, None]
      x = g * h + (1 - g) * wte(tok)
      mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
      pos = torch.full((batch, 1), PROMPT + t)
      out = hf.transformer(inputs_embeds=x[:, None], past_key_values=past, attention_mask=mask, position_ids=pos,
                           use_cache=True)
      past, h = out.past_key_values, out.last_hidden_state[:, -1]
      tokens.append(tok)
    return torch.stack(tokens, 1)

  return run


def timed(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='tiny shape only, 64 new tokens')
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  print(f'devices: jax {jax.devices()}, torch {torch.__version__} threads={torch.get_num_threads()}')
  matmul = best_matmul_gflops()
  print(f'best XLA matmul (2048x768x3072): {matmul:.1f} GFLOP/s')
  new_tokens = 64 if args.quick else 128
  ratios = {}
  for shape in (['tiny'] if args.quick else ['tiny', 'small']):
    model = build(shape)
    with tempfile.TemporaryDirectory() as torch_dir:
      hf_io.export_pretrained(model.gpt2, torch_dir, num_tokens=model.gpt2.cfg.vocab_rows)
      for batch in (8, 64):
        n = batch * new_tokens
        t_jax = timed(jax_generate_fn(model, batch, new_tokens), args.repeats)
        t_torch = timed(torch_generate_fn(model, batch, new_tokens, torch_dir), 1)
        gflops = flops_per_token(model.gpt2.cfg, PROMPT + new_tokens / 2) * n / t_jax / 1e9
        ratio = t_torch / t_jax
        ratios.setdefault(shape, []).append(ratio)
        print(f'{shape:5s} b{batch:<3d} dtt_jax {n / t_jax:8.1f} tok/s ({gflops:5.1f} GFLOP/s)   '
              f'pytorch {n / t_torch:8.1f} tok/s   ratio {ratio:.2f}')
  # Per-token cost vs total length (prompt 32 + new tokens), tiny b8: flat means attention work stays small.
  model = build('tiny')
  for total in (128, 256, 512, 1024):
    t = timed(jax_generate_fn(model, 8, total - PROMPT), 1)
    print(f'tiny b8 total length {total:4d}: {t / (total - PROMPT) * 1e3:6.2f} ms per step '
          f'({8 * (total - PROMPT) / t:7.1f} tok/s)')
  print('speedup: ' + ' '.join(f'{k}={min(v):.2f}' for k, v in ratios.items()))


if __name__ == '__main__':
  main()
