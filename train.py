"""Trains a HaloNet: `python train.py --config=configs/quickstart.py --workdir=/tmp/qs`.

Rerunning with the same workdir resumes from its latest complete checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

import jax

from halonet import checkpointing
from halonet import train_lib

config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, config.json, metrics and results.json.')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume even if the config differs from the one in workdir/config.json.')
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
  train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                               allow_config_change=FLAGS.allow_config_change)


if __name__ == '__main__':
  app.run(main)
