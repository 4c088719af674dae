"""Evaluates a checkpoint: `python eval.py --workdir=W [--step=N] [--config.field=value ...]`.

Without --config it evaluates the run as W/config.json stored it (configs/stored.py). Reports
raw and (when trained with one) EMA params on config.input.eval_splits of config.input.dataset
and on the run's config.evals (ReaL, ImageNet-V2/A/R/Sketch/C, few-shot probes; another list with
--config.evals='("imagenet_a", "fewshot:digits")'), and appends one record per (step, dataset,
split or evaluator, weights) to W/eval_records.jsonl.
"""

from collections.abc import Sequence
import os

from absl import flags

from halonet.train import launch

launch.define_flags("The training run's workdir.")
flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: latest).')
flags.adopt_module_key_flags(launch)  # --help lists --config, --workdir, --distributed.
FLAGS = flags.FLAGS
STORED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'stored.py')


def parse_flags(argv: Sequence[str]) -> list[str]:
  """launch.parse_flags, with --config defaulting to the workdir's stored config."""
  args = list(argv[1:])
  if not any(a == '--config' or a.startswith('--config=') for a in args):
    for i, a in enumerate(args):
      if a.startswith('--workdir=') or (a == '--workdir' and i + 1 < len(args)):
        workdir = a.split('=', 1)[1] if '=' in a else args[i + 1]
        args.insert(0, f'--config={STORED_CONFIG}:{workdir}')
        break
  return launch.parse_flags([argv[0], *args])


def main(argv):
  launch.start(argv)
  # pylint: disable=g-import-not-at-top  # After --help and flags.
  from halonet.detection import checks as detection_checks
  from halonet.detection import evaluation as detection_eval
  from halonet.train import evaluation as eval_lib

  with launch.one_line_errors():
    detection_checks.validate_task(FLAGS.config)
    task = detection_eval if FLAGS.config.task == 'detection' else eval_lib
    task.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)


if __name__ == '__main__':
  launch.run(main, flags_parser=parse_flags)
