"""Entry point: `python -m dtt_jax.main --config=configs/<dataset>.py[:stage] --workdir=DIR [--config.x=y ...]`.

Stages: 'bootstrap', 'grpo', 'eval', or 'pipeline' (all three in order; the default). Each stage resumes from its
checkpoints in the workdir, so rerunning the same command after an interruption continues where it stopped. A run
stopped by SIGTERM / SIGINT writes its checkpoint and exits with `INTERRUPTED_EXIT` (143, 128 + SIGTERM), so that a
scheduler or `dtt_jax.eval.study` tells it from a finished one (exit 0).
"""

from __future__ import annotations

import logging
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from dtt_jax import pipeline
from dtt_jax.checkpoint import CheckpointError
from dtt_jax.workdir import WorkdirError

INTERRUPTED_EXIT = 128 + signal.SIGTERM
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path of an ml_collections config file (configs/*.py[:stage]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and reports.')
flags.DEFINE_string('coordinator', '', 'Multi-host: host:port of process 0 for jax.distributed ("" = single process;'
                    ' "auto" = detect from SLURM / TPU environment).')
flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes (with --coordinator host:port).')
flags.DEFINE_integer('process_id', -1, 'Multi-host: this process (with --coordinator host:port).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s',
                      stream=sys.stderr, force=True)
  logging.getLogger('absl').setLevel(logging.WARNING)  # Orbax logs every file operation at INFO
  # Outside a training loop (which finishes its step and checkpoints first), SIGTERM exits through the cleanup
  # code: the workdir lock is released and pending checkpoint writes finish.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(INTERRUPTED_EXIT))
  pipeline.init_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  try:
    finished = pipeline.run(FLAGS.config, FLAGS.workdir)
  except (WorkdirError, CheckpointError) as e:  # the message says what to do; no traceback
    logging.error('%s', e)
    sys.exit(1)
  if not finished:  # a signal stopped training after its checkpoint: not done, rerun the command to resume
    sys.exit(INTERRUPTED_EXIT)


if __name__ == '__main__':
  app.run(main)
