"""The quickstart (tiny model from scratch, generated addition, 2 CPU cores) with HRPO's thinking-residual gate in
both stages instead of the Gumbel-sigmoid gate head (dtt_jax/model/dtt.py).

python -m dtt_jax.main --config=configs/hrpo.py --workdir=runs/hrpo
"""

from configs import quickstart


def get_config(stage: str = ''):
  c = quickstart.get_config(stage)
  c.model.gate = 'hrpo'
  return c
