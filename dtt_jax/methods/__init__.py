"""Training methods as plug-ins (`base.Method`), by `config.method`: 'dtt' (`dtt.py`: bootstrap + GRPO),
'think_tokens' (`think_tokens/`: a teacher LM, then thinking tokens by RL), and COCONUT's layouts
(`curriculum.py`: 'coconut', 'pause_as_thought', 'cot', 'no_cot', 'pause', 'coconut_no_thought', 'icot').

Adding a method: a module with a `base.Method` subclass, its entry here, and a config.
"""

from __future__ import annotations

from dtt_jax.data import coconut as coconut_data
from dtt_jax.methods import base, curriculum, dtt
from dtt_jax.methods.think_tokens import ThinkTokens

REGISTRY: dict[str, base.Method] = {
    'dtt': dtt.DTT(),
    'think_tokens': ThinkTokens(),
    **{name: curriculum.CurriculumMethod() for name in coconut_data.METHODS},
}


def get(name: str) -> base.Method:
  if name not in REGISTRY:
    raise ValueError(f'config.method={name!r}: expected one of {", ".join(map(repr, REGISTRY))}.')
  return REGISTRY[name]
