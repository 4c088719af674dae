"""Evaluates a checkpoint: `python eval.py --config=... --workdir=... [--step=N]`.

Reports raw and (when trained with one) EMA params on config.eval_splits and merges the
figures into workdir/eval_results.json under the step.
"""

from absl import app
from absl import flags

from halonet import launch
from halonet import train_lib

launch.define_flags("The training run's workdir.")
flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: latest).')
FLAGS = flags.FLAGS


def main(argv):
  launch.start(argv)
  with launch.one_line_errors():
    train_lib.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)


if __name__ == '__main__':
  app.run(main, flags_parser=launch.parse_flags)
