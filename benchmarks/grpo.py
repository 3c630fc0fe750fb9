"""One full GRPO iteration (rollout + update): dtt_jax vs TRL's `GRPOTrainer`, side by side, CPU, fp32.

Both sides: the same tiny GPT-2 (4 layers, d=256, 4 heads, the full GPT-2 vocabulary + the 4 DTT specials; the JAX
model is exported with `hf_io.export_pretrained` and TRL loads that directory, with the tokenizer saved beside it),
the same 8 prompts, G=8 completions each (64 sequences), 64 sampled completion tokens (temperature 1, no top-k/p),
beta 0.04 (k3 KL to a frozen reference: a second forward pass of the reference model over every completion), one
optimizer update per rollout (mu = num_iterations = 1), 'grpo' loss aggregation, AdamW with clipping at 1.0, and
the same reward (`dtt_jax.reward.compute_rewards`, the composite SPEC §8 reward, on the decoded completions).

An iteration is: sample 64 completions, decode and score them, the reference log-probs, the group advantages, one
forward + backward pass of the policy over prompt + completion, and the optimizer step.

* TRL cannot blend latents, so the comparison is the token-only configuration of dtt_jax: the gate bias is -30, so
  the gate is 0 and every input is the token embedding (the blend is still computed, so dtt_jax does the work of the
  latent path). dtt_jax with latents on (gate bias 0, random gate weights, Gumbel noise) is reported too.
* Steady state: each dtt_jax configuration runs one untimed iteration first (compilation), and TRL's first step
  is its warm-up and is not timed. The machine is shared and noisy, so the two sides are interleaved: after every
  TRL step (a `TrainerCallback.on_step_end`) one dtt_jax iteration of each configuration runs, and each figure is
  the median of its timed iterations. TRL's step time runs from the end of the previous dtt_jax iterations to
  `on_step_end`, so it includes generation, rewards, the reference pass, the update and the trainer's bookkeeping;
  dtt_jax's includes the same work, from prompts on the host to updated parameters ready.
* The machine's load changes the ratio: other processes competing for the cores slow TRL (two torch threads) much
  more than dtt_jax, so the script prints the load average; compare figures taken at a low load.
* The reward is the same on both sides, and a random model gets -1.5 (no structure, wrong answer) on every
  completion, so every group has zero spread; neither side skips any work for that (TRL still runs its forward and
  backward passes; dtt_jax's step is one compiled program).

    python benchmarks/grpo.py              # 4 TRL steps (3 timed), 4 timed dtt_jax iterations per configuration
    python benchmarks/grpo.py --quick      # 3 TRL steps (2 timed)
    python benchmarks/grpo.py --skip-trl   # dtt_jax only

Last line: `speedup: <ratio>` = TRL median step time / dtt_jax median iteration time (token-only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from flax import nnx  # pylint: disable=wrong-import-position

from dtt_jax import parallel, reward, tokens  # pylint: disable=wrong-import-position
from dtt_jax.model import hf_io  # pylint: disable=wrong-import-position
from dtt_jax.model.dtt import DTTConfig, DTTModel  # pylint: disable=wrong-import-position
from dtt_jax.model.gpt2 import GPT2Config  # pylint: disable=wrong-import-position
from dtt_jax.rl import grpo, rollout  # pylint: disable=wrong-import-position
from dtt_jax.train import state as state_lib  # pylint: disable=wrong-import-position

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, 'shared', 'data',
                             'gpt2_tokenizer')
TINY = dict(n_layer=4, n_embd=256, n_head=4)
NUM_GENERATIONS = 8
NEW_TOKENS = 64
BETA = 0.04
LR = 1e-5
GRAD_CLIP = 1.0
TAU = 1.0
QUESTIONS = ['12 + 35 =', '407 + 96 =', '2318 + 77 =', '64 + 58 =', '901 + 999 =', '1234 + 4321 =', '55 + 5 =',
             '780 + 3301 =']
ANSWERS = [str(eval(q.rstrip(' =')))  # pylint: disable=eval-used
           for q in QUESTIONS]


def build(latent: bool) -> DTTModel:
  """latent: gate bias 0 and random gate weights (gates spread over (0,1)); else bias -30 (gate = 0: tokens only)."""
  cfg = GPT2Config(vocab_rows=50304, num_tokens=tokens.GPT2_VOCAB, n_positions=1024, **TINY)
  model = DTTModel(DTTConfig(cfg, gate_bias_init=0.0 if latent else -30.0), rngs=nnx.Rngs(0))
  if latent:
    model.gate_head.kernel[...] = 0.05 * jax.random.normal(jax.random.key(1), (cfg.n_embd, 1))
  return model


def left_padded_prompts(hf_tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """The questions as TRL tokenizes them (no special tokens), left-padded with eos -> [8,P] ids, mask."""
  ids = [hf_tokenizer(q, add_special_tokens=False)['input_ids'] for q in QUESTIONS]
  p = max(map(len, ids))
  prompt = np.full((len(ids), p), tokens.EOS_ID, np.int32)
  mask = np.zeros((len(ids), p), np.int32)
  for i, row in enumerate(ids):
    prompt[i, p - len(row):] = row
    mask[i, p - len(row):] = 1
  return prompt, mask


# ----------------------------------------------------------------------------------------------------------- JAX


class JaxSide:
  """RolloutCollector (engine + reference re-score + reward) and the jitted GRPO step, on all local devices."""

  def __init__(self, model: DTTModel, hf_tokenizer):
    self.mesh = parallel.make_mesh()
    self.cfg = grpo.GRPOConfig(num_generations=NUM_GENERATIONS, beta=BETA, loss_agg='grpo', temperature=1.0,
                               max_new_tokens=NEW_TOKENS, max_think=0, gate_noise=True)
    graphdef, params = state_lib.split_model(model)
    params = jax.device_get(params)
    self.tx = state_lib.make_optimizer(LR, 1000, 0, 0.0, GRAD_CLIP)
    self.state = parallel.replicate(state_lib.init_state(params, self.tx, seed=0), self.mesh)
    self.ref_params = parallel.replicate(params, self.mesh)
    tokenizer = tokens.Tokenizer(hf_tokenizer, tokens.Vocab.full())
    self.collector = rollout.RolloutCollector(graphdef, self.cfg, tokenizer, 'addition', self.mesh)
    self.step_fn = grpo.make_grpo_step(graphdef, self.tx, self.cfg, self.mesh)
    self.prompt, self.prompt_mask = left_padded_prompts(hf_tokenizer)
    self.iterations = 0

  def iteration(self) -> dict[str, float]:
    """Rollout + update; returns the step's metrics (fetched after the state is ready)."""
    key = jax.random.key(self.iterations)
    self.iterations += 1
    batch, _ = self.collector.collect(self.state.params, self.ref_params, self.prompt, self.prompt_mask, ANSWERS,
                                      key, TAU)
    self.state, metrics = self.step_fn(self.state, batch)
    jax.block_until_ready(self.state)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  def timed(self, n: int) -> tuple[list[float], dict[str, float]]:
    times, metrics = [], {}
    for _ in range(n):
      t = time.perf_counter()
      metrics = self.iteration()
      times.append(time.perf_counter() - t)
    return times, metrics


# ----------------------------------------------------------------------------------------------------------- TRL


def trl_reward(prompts, completions, completion_ids, answer, **_):
  """The same composite reward as dtt_jax's rollouts (gates 0: TRL has no gate)."""
  del prompts
  n = len(completion_ids)
  t = max(1, max(map(len, completion_ids)))
  ids = np.full((n, t), tokens.EOS_ID, np.int64)
  mask = np.zeros((n, t), np.int32)
  for i, row in enumerate(completion_ids):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  r = reward.compute_rewards(ids, mask, np.zeros((n, t)), list(completions), list(answer), 'addition',
                             tokens.Vocab.full())
  return [float(x) for x in r['total']]


def run_trl(hf_dir: str, steps: int, workdir: str, between_steps) -> tuple[list[float], dict]:
  """TRL GRPOTrainer for `steps` optimizer steps, calling `between_steps()` after each (not timed as TRL's).

  -> (seconds of each TRL step, the last logged step metrics).
  """
  import datasets  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  datasets.disable_progress_bars()

  class Interleave(transformers.TrainerCallback):
    """TRL's step time = from the end of the previous `between_steps()` to this step's `on_step_end`."""

    def __init__(self):
      self.resume, self.times, self.logs = 0.0, [], {}

    def on_train_begin(self, args, state, control, **kwargs):
      self.resume = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      self.times.append(time.perf_counter() - self.resume)
      between_steps()
      self.resume = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
      if logs and 'completions/mean_length' in logs:
        self.logs = dict(logs)

  data = datasets.Dataset.from_dict({'prompt': QUESTIONS, 'answer': ANSWERS})
  args = trl.GRPOConfig(
      output_dir=workdir, per_device_train_batch_size=len(QUESTIONS) * NUM_GENERATIONS,
      num_generations=NUM_GENERATIONS, max_completion_length=NEW_TOKENS, beta=BETA, loss_type='grpo',
      num_iterations=1, temperature=1.0, learning_rate=LR, weight_decay=0.0, max_grad_norm=GRAD_CLIP,
      lr_scheduler_type='constant', max_steps=steps, logging_steps=1, report_to=[], use_cpu=True,
      save_strategy='no', disable_tqdm=True, shuffle_dataset=False, seed=0)
  callback = Interleave()
  trainer = trl.GRPOTrainer(model=hf_dir, reward_funcs=trl_reward, args=args, train_dataset=data,
                            processing_class=transformers.AutoTokenizer.from_pretrained(hf_dir),
                            callbacks=[callback])
  trainer.remove_callback(transformers.PrinterCallback)
  trainer.train()
  return callback.times, callback.logs


# ---------------------------------------------------------------------------------------------------------- main


def _summary(times: list[float]) -> str:
  return f'median {statistics.median(times):7.2f} s  best {min(times):7.2f} s  ({len(times)} iterations)'


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='2 timed iterations per side')
  parser.add_argument('--repeats', type=int, default=3, help='timed iterations per side')
  parser.add_argument('--skip-trl', action='store_true', help='dtt_jax only (no ratio)')
  args = parser.parse_args()
  repeats = 2 if args.quick else args.repeats
  warnings.filterwarnings('ignore')
  import torch  # pylint: disable=g-import-not-at-top
  hf_tokenizer = tokens.load_tokenizer(TOKENIZER_DIR)
  print(f'devices: jax {jax.devices()} (cpu cores {os.cpu_count()}), torch {torch.__version__} '
        f'threads={torch.get_num_threads()}, fp32; load average at start {os.getloadavg()[0]:.1f}')
  print(f'tiny GPT-2 {TINY}, vocabulary {tokens.GPT2_VOCAB} (dtt_jax rows padded to 50304), {len(QUESTIONS)} prompts '
        f'x G={NUM_GENERATIONS}, {NEW_TOKENS} completion tokens, beta {BETA}, mu 1, loss grpo')

  with tempfile.TemporaryDirectory() as tmp:
    token_model = build(latent=False)
    hf_dir = os.path.join(tmp, 'tiny_gpt2')
    hf_io.export_pretrained(token_model.gpt2, hf_dir)
    hf_tokenizer.save_pretrained(hf_dir)

    sides = {'token-only': JaxSide(token_model, hf_tokenizer), 'latents on': JaxSide(build(latent=True), hf_tokenizer)}
    times = {name: [] for name in sides}
    metrics = {}
    for name, side in sides.items():
      t = time.perf_counter()
      warm = side.iteration()
      print(f'dtt_jax {name}: first iteration (compilation) {time.perf_counter() - t:.1f} s; completion length '
            f'{warm["completion_length"]:.1f}')

    def jax_iterations():
      for name, side in sides.items():
        t = time.perf_counter()
        metrics[name] = side.iteration()
        times[name].append(time.perf_counter() - t)

    trl_times = []
    if args.skip_trl:
      for _ in range(repeats):
        jax_iterations()
    else:
      t = time.perf_counter()
      trl_times, logs = run_trl(hf_dir, repeats + 1, os.path.join(tmp, 'trl'), jax_iterations)
      trl_times = trl_times[1:]  # the first step is TRL's warm-up
      print(f'TRL: {repeats + 1} steps interleaved with dtt_jax iterations, {time.perf_counter() - t:.1f} s in all; '
            f'completion length {logs.get("completions/mean_length", float("nan")):.1f}, '
            f'reward {logs.get("reward", float("nan")):.2f}, kl {logs.get("kl", float("nan")):.2e}')

  m_tok, m_lat = metrics['token-only'], metrics['latents on']
  print(f'dtt_jax token-only  : {_summary(times["token-only"])}   (kl {m_tok["kl"]:.2e}, logprob mismatch '
        f'{m_tok["logprob_mismatch"]:.1e}, gate outer {m_tok["gate_outer"]:.3f}, reward {m_tok["reward"]:.2f})')
  print(f'dtt_jax latents on  : {_summary(times["latents on"])}   (gate outer {m_lat["gate_outer"]:.3f}, '
        f'logprob mismatch {m_lat["logprob_mismatch"]:.1e})')
  print(f'load average at the end: {os.getloadavg()[0]:.1f} (other processes on the machine slow both sides, TRL more)')
  if trl_times:
    print(f'TRL GRPOTrainer     : {_summary(trl_times)}')
    ratio = statistics.median(trl_times) / statistics.median(times['token-only'])
    latent_ratio = statistics.median(trl_times) / statistics.median(times['latents on'])
    pairs = [a / b for a, b in zip(trl_times, times['token-only'][1:])]
    print(f'TRL / dtt_jax (token-only): {ratio:.2f}x (per adjacent pair: {", ".join(f"{r:.2f}" for r in pairs)}); '
          f'TRL / dtt_jax (latents on): {latent_ratio:.2f}x')
    print(f'speedup: {ratio:.2f}')


if __name__ == '__main__':
  main()
