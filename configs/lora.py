"""The quickstart (generated addition, 2 CPU cores) with LoRA: only the rank-16 adapters on every attention and MLP
projection and the gate train; the rest of the model stays at its initialisation (dtt_jax/model/lora.py).

With a random frozen base this only exercises the mechanism at tiny scale: measured at 400 bootstrap steps (lr 3e-3
or 1e-2) it does not learn the format (structure rate 0; the completion repeats <|eot|>). The intended use is a
pretrained base: `--config.model.init=gpt2 --config.model.vocab=full` (or a local HF GPT-2 directory).

python -m dtt_jax.main --config=configs/lora.py --workdir=runs/lora
"""

from configs import quickstart


def get_config(stage: str = ''):
  c = quickstart.get_config(stage)
  c.lora.enabled = True
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.bootstrap.lr = 3e-3  # adapters of a frozen base take a larger step than full fine-tuning
  return c
