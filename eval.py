"""Evaluates a checkpoint: `python eval.py --config=... --workdir=... [--step=N]`.

Reports raw and (when trained with one) EMA params on config.eval_splits and merges the
figures into workdir/eval_results.json under the step.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

import jax

from halonet import checkpointing
from halonet import train_lib

config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'The training run\'s workdir.')
flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: latest).')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() first (multi-host pods).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  checkpointing.quiet_orbax_info_logs()
  if FLAGS.distributed:
    jax.distributed.initialize()
  train_lib.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)


if __name__ == '__main__':
  app.run(main)
