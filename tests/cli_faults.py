"""`python -m tests.cli_faults <the dtt_jax.main flags>`: the real CLI with one fault injected, for the workdir tests.

DTT_FAULT (one of):
  rollout:<n>:<seconds>       the n-th GRPO rollout of this process pauses (a window to send a signal)
  eval:<seconds>              the evaluation stage's generation pauses
  checkpoint:<step>:<seconds> the async write of checkpoint <step> stalls before its final rename
  full_disk:<step>            the write of checkpoint <step> fails with OSError(ENOSPC) before its final rename
DTT_FAULT_MARKER: a file created when the fault point is reached.
"""

import errno
import os
import pathlib
import runpy
import time


def _reached(seconds: float = 0.0) -> None:
  pathlib.Path(os.environ['DTT_FAULT_MARKER']).touch()
  time.sleep(seconds)


def install(fault: str) -> None:
  kind, *args = fault.split(':')
  if kind == 'rollout':
    from dtt_jax.rl import rollout  # pylint: disable=g-import-not-at-top
    collect, calls = rollout.RolloutCollector.collect, [0]

    def paused_collect(self, *a, **k):
      calls[0] += 1
      if calls[0] == int(args[0]):
        _reached(float(args[1]))
      return collect(self, *a, **k)

    rollout.RolloutCollector.collect = paused_collect
  elif kind == 'eval':
    from dtt_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
    generate_all = evaluate.generate_all

    def paused_generate_all(*a, **k):
      _reached(float(args[0]))
      return generate_all(*a, **k)

    evaluate.generate_all = paused_generate_all
  elif kind in ('checkpoint', 'full_disk'):
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def faulty_finalize(self, *a, **k):
      if os.path.basename(str(self._final_path)) == args[0]:  # pylint: disable=protected-access
        if kind == 'full_disk':
          raise OSError(errno.ENOSPC, 'No space left on device')
        _reached(float(args[1]))
      return await finalize(self, *a, **k)

    atomicity.AtomicRenameTemporaryPath.finalize = faulty_finalize
  else:
    raise ValueError(f'DTT_FAULT={fault!r}: unknown fault')


if __name__ == '__main__':
  install(os.environ['DTT_FAULT'])
  runpy.run_module('dtt_jax.main', run_name='__main__', alter_sys=True)
