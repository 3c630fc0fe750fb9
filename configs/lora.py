"""LoRA (dtt_jax/model/lora.py): rank-16 adapters on every attention and MLP projection; the gate and
`lora.train_modules` (default the tied embedding `wte`) train too, the rest of the model stays frozen.

The intended use is fine-tuning a trained model: a full bootstrap, then GRPO with fresh adapters on its weights
(B = 0, so the policy and the KL reference start as the bootstrap model; the reference is that start, frozen):

nice -n 19 python -m dtt_jax.main --config=configs/quickstart.py:bootstrap --workdir=/tmp/lora_base \
    --config.bootstrap.steps=400
nice -n 19 python -m dtt_jax.main --config=configs/lora.py:grpo --config.init_from=/tmp/lora_base \
    --workdir=/tmp/lora_grpo
nice -n 19 python -m dtt_jax.main --config=configs/lora.py:eval --workdir=/tmp/lora_grpo

Measured on 2 shared CPU cores (evaluation stage: 256 held-out prompts, greedy): the 400-step bootstrap has
structure 1.0, accuracy 0, reward -0.350; 60 GRPO steps with LoRA at lr 1e-4 give structure 1.0, accuracy 0, reward
-0.330 (full GRPO, configs/quickstart.py:grpo at lr 5e-5: -0.319), training-batch KL 0.57 to the reference at the
last step. Trainable 245,889 of 675,457 parameters (adapters 65,536, wte 180,224, gate 129), optimizer state 491,782
values (full GRPO: 1,219,846); wall 40 s (full: 35 s; at this size the adapters cost more compute than the frozen
base saves). At lr 5e-4 the policy drifted (KL 2.9, completions up to the 20-token limit) for reward -0.310.

`python -m dtt_jax.main --config=configs/lora.py --workdir=runs/lora` runs the whole pipeline with LoRA from the
start, on a random frozen base (a test of the mechanism). Its 400-step bootstrap (`:bootstrap
--config.bootstrap.steps=400`, 106 s) learns the format with `wte` trained: structure 1.0, accuracy 0, reward -0.350,
loss 1.88 (full bootstrap: 1.78); with `--config.lora.train_modules="()"` (the behaviour before that key) it did
not (structure 0, the completion repeats <|eot|>; measured at lr 3e-3 and 1e-2). With a pretrained base:
`--config.model.init=gpt2 --config.model.vocab=full`.
"""

from configs import quickstart


def get_config(stage: str = ''):
  c = quickstart.get_config(stage)
  c.lora.enabled = True
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.bootstrap.lr = 3e-3  # adapters of a frozen base take a larger step than full fine-tuning
  c.grpo.lr = 1e-4  # 2x the quickstart's full-model rate; 5e-4 drifted far from the reference (see above)
  return c
