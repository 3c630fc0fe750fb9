"""DTT on Qwen2.5-Instruct (0.5B, 1.5B or 3B) for GSM8K, set up like HRPO's GSM8K runs (arXiv:2505.18454):
`--config=configs/qwen_gsm8k.py[:<size>[,<stage>]]`, size '0.5b' | '1.5b' (default) | '3b'.

    python -m dtt_jax.main --config=configs/qwen_gsm8k.py:1.5b --workdir=runs/qwen_gsm8k            # 4 x 24 GB
    python -m dtt_jax.main --config=configs/qwen_gsm8k.py:3b --workdir=runs/qwen_gsm8k_3b           # 8 x 80 GB

Memory before a run (no weights needed, CPU is enough; build, shard, report, exit):

    python -m dtt_jax.main --config=configs/qwen_gsm8k.py:1.5b --workdir=/tmp/dry --config.dry_run=True

What follows HRPO: Qwen2.5-Instruct weights from the hub (`model.init`; a local HF directory works too, the
tokenizer comes from it with the DTT specials added), HRPO's thinking-residual gate (`model.gate='hrpo'`, a in
[0.99, 0.999] at the start), LoRA rank 32 (alpha 64) on every attention and MLP projection (and the tied
embedding trained, so the DTT specials' rows, which start as copies, can move apart), GRPO with groups of 4,
sampling temperature 0.5, KL beta 0.005, lr 5e-6, bf16 compute with fp32 master weights and Adam state. The HRPO
repository was not reachable from the machine that wrote this file; these values are the paper's as we read them,
so check them before a like-for-like comparison. What is this project's: a short supervised bootstrap (the
`<|bot|> ... <|eot|>` format on GSM8K's worked solutions) before GRPO, the reward of SPEC §7, and the budgets below.

Memory (docs/scaling.md): block rematerialization (`model.remat='block'`), GRPO gradient accumulation
(`grpo.microbatches`: one or two completions per device and pass), and the layout of each size (`LAYOUTS`: 0.5B and
1.5B on 4 devices, 3B on 8, the parameters, gradients and Adam state split over all of them).

The trunk's sizes are also written into `config.model` (family, layers, widths, heads, rope theta, and `vocab_size`:
the tokenizer's size, `len(tokenizer)`, the rows a run builds before the DTT specials): `dry_run` uses them when the
checkpoint is not on this machine.
"""

from configs import base

# Qwen2.5-Instruct config.json values: (hidden, layers, heads, kv heads, MLP width)
SIZES = {'0.5b': (896, 24, 14, 2, 4864), '1.5b': (1536, 28, 12, 2, 8960), '3b': (2048, 36, 16, 2, 11008)}
TOKENIZER_SIZE = 151665  # len(tokenizer) of every Qwen2.5 size (config.json's vocab_size, 151936, pads the rows)
LAYOUTS = {'0.5b': 4, '1.5b': 4, '3b': 8}  # devices, all of them on the fsdp axis


def get_config(arg: str = ''):
  size, stage = (arg.split(',') + [''])[:2]
  size = size or '1.5b'
  if size not in SIZES:
    raise ValueError(f'configs/qwen_gsm8k.py:{arg!r}: expected "<size>[,<stage>]" with size one of '
                     f'{", ".join(SIZES)}.')
  c = base.get_config()
  c.dataset.name = 'gsm8k'
  m = c.model
  m.init = f'Qwen/Qwen2.5-{size.upper()}-Instruct'
  m.vocab = 'full'
  m.family = 'qwen2'
  m.n_embd, m.n_layer, m.n_head, m.n_kv_head, m.intermediate_size = SIZES[size]
  m.vocab_size = TOKENIZER_SIZE
  m.n_positions = 32768
  m.rope_theta = 1e6
  m.tie_word_embeddings = True
  m.dtype, m.param_dtype = 'bfloat16', 'float32'
  m.gate = 'hrpo'
  m.remat = 'block'
  c.lora.enabled = True
  c.lora.rank, c.lora.alpha = 32, 64.0
  c.lora.targets = ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj',
                    'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj')
  c.lora.train_modules = ('wte',)  # the tied embedding: the DTT specials' rows start as copies and must move apart
  c.num_devices = c.parallel.fsdp = LAYOUTS[size]
  c.data.span = 'cot'  # the bootstrap's span: GSM8K's worked solution
  c.data.max_prompt_len = 256
  c.data.max_completion_len = 512
  c.bootstrap.steps = 200
  c.bootstrap.batch_size = 32
  c.bootstrap.microbatches = 4
  c.bootstrap.lr = 1e-4  # adapters and gate
  c.bootstrap.warmup_steps = 20
  c.bootstrap.eval_every = c.bootstrap.checkpoint_every = 100
  c.generate.max_new_tokens = 512
  c.generate.max_think = 384
  c.generate.batch_size = 32
  c.grpo.steps = 1000
  c.grpo.prompts_per_step = 8  # x 4 completions: 8 per device on 4 devices, 4 on 8
  c.grpo.microbatches = 4
  c.grpo.num_generations = 4
  c.grpo.lr = 5e-6
  c.grpo.beta = 0.005
  c.grpo.temperature = 0.5
  c.grpo.max_new_tokens = 512
  c.grpo.max_think = 384
  c.grpo.gate_noise = False  # HRPO's gate is deterministic (its randomness is the sampled token)
  c.grpo.eval_every = c.grpo.checkpoint_every = 50
  c.stage = stage or c.stage
  return c
