"""Trains a HaloNet: `python train.py --config=configs/quickstart.py --workdir=/tmp/qs`, or
Mask R-CNN on one (config.task='detection'): `--config=configs/detection.py:digits`.

Rerunning with the same workdir resumes from its latest complete checkpoint.
"""

from absl import flags

from halonet.train import launch

launch.define_flags('Checkpoints, config.json, metrics and results.json.')
flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Resume even if the config differs from the one in workdir/config.json.',
)
flags.adopt_module_key_flags(launch)  # --help lists --config, --workdir, --distributed.
FLAGS = flags.FLAGS


def main(argv):
  launch.start(argv)
  # pylint: disable=g-import-not-at-top  # After --help and flags.
  from halonet.detection import checks as detection_checks
  from halonet.detection import training as detection_lib
  from halonet.train import loop as train_lib

  with launch.one_line_errors():
    detection_checks.validate_task(FLAGS.config)
    task = detection_lib if FLAGS.config.task == 'detection' else train_lib
    task.train_and_evaluate(
      FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change
    )


if __name__ == '__main__':
  launch.run(main, flags_parser=launch.parse_flags)
