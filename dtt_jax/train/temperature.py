"""Gumbel-sigmoid temperature (SPEC §6): exponential tau0 -> tau_min over the stage, halved on plateaus.

    tau(step) = max(tau_min, scale * tau0 * (tau_min / tau0) ** (step / total_steps))

`scale` starts at 1 and is multiplied by 0.5 each time the validation metric has not improved for `patience`
consecutive validations. The state is a small dict saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Temperature:
  tau0: float = 2.0
  tau_min: float = 0.1
  total_steps: int = 1000
  patience: int = 3
  scale: float = 1.0
  best: float | None = None
  stale: int = 0  # validations since the last improvement

  def __call__(self, step: int) -> float:
    frac = min(max(step / max(self.total_steps, 1), 0.0), 1.0)
    return max(self.tau_min, self.scale * self.tau0 * (self.tau_min / self.tau0) ** frac)

  def update(self, metric: float) -> bool:
    """Record a validation metric (higher is better); returns True when the temperature was halved."""
    if self.best is None or metric > self.best:
      self.best, self.stale = metric, 0
      return False
    self.stale += 1
    if self.stale < self.patience:
      return False
    self.scale *= 0.5
    self.stale = 0
    return True

  def state(self) -> dict:
    return {'scale': self.scale, 'best': self.best, 'stale': self.stale}

  def restore(self, state: dict) -> None:
    self.scale, self.best, self.stale = float(state['scale']), state['best'], int(state['stale'])
