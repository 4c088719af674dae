"""Predicts the classes of images with a trained run:

  python predict.py --workdir=W photo.jpg more_photos/ [--top_k=5] [--output=PATH]

Images of any size, mode (grey, RGB, RGBA) and format (JPEG, PNG, GIF, BMP) are converted as
evaluation converts them. Prints each image's top-k classes (names from the dataset, e.g. an
image folder's sub-folders) with probabilities and writes them to a JSON file, by default
W/predictions.json, never replacing one (predictions.1.json, ... when taken). Images, the
workdir and the output may be local paths or URLs (halonet/paths.py). A file that is not an
image is named in one line and the others are still predicted; the exit status is then 1.

On a detection run (config.task='detection') it prints each image's detections above
--score_threshold, writes them (boxes, classes, scores, masks run-length encoded) to
W/detections.json and draws each image with its masks, boxes and classes as a PNG in
W/detections_drawn/.
"""

import sys

from absl import app
from absl import flags

from halonet import errors
from halonet import paths
from halonet.data import sources as data_sources
from halonet.tools import trained
from halonet.train import launch  # pylint: disable=g-bad-import-order  # First: quiets TensorFlow.
from halonet.train import workdir as workdir_lib

flags.DEFINE_string('workdir', None, "The training run's workdir (config.json, checkpoints).")
flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
flags.DEFINE_enum('weights', 'raw', trained.WEIGHTS, 'Raw parameters, or their EMA if kept.')
flags.DEFINE_integer('top_k', 5, 'Classes to report per image.', lower_bound=1)
flags.DEFINE_float(
  'score_threshold', 0.5, 'Detection runs: detections kept from this score on.', lower_bound=0
)
flags.DEFINE_string(
  'output', None, 'JSON file written, never overwritten (default: WORKDIR/predictions.json).'
)
flags.mark_flag_as_required('workdir')
FLAGS = flags.FLAGS


def detect(image_paths: list[str]) -> dict[str, str]:
  """A detection run's detections on the images: printed, in a JSON file, and drawn as PNGs in
  a folder beside it; returns the files left out, with why."""
  from halonet.detection import predict as detection  # pylint: disable=g-import-not-at-top

  if FLAGS.weights != 'raw':
    raise errors.ConfigError(f'--weights={FLAGS.weights}: a detection run keeps raw weights only')
  predictor = detection.load(FLAGS.workdir, FLAGS.step)
  names = detection.class_names(predictor.config)
  files, images, problems = detection.read_images(image_paths)
  for path, why in problems.items():
    print(f'ERROR {path}: {why}', file=sys.stderr)
  output = paths.unused_path(FLAGS.output or str(paths.path(FLAGS.workdir) / 'detections.json'))
  drawings = paths.path(output).parent / (paths.path(output).stem + '_drawn')
  predictions = []
  for path, image, found in zip(files, images, predictor.detect(images, FLAGS.score_threshold)):
    drawn = detection.write_drawing(
      detection.draw(image, found, names), str(drawings / (paths.path(path).stem + '.png'))
    )
    predictions.append({**detection.as_json(path, found, names), 'drawn': drawn})
    print(
      f'{path}: '
      + ('; '.join(f'{d["class"]} {d["score"]:.3f}' for d in predictions[-1]['detections']) or '-')
      + f' ({drawn})'
    )
  paths.write_json(
    output,
    {
      'workdir': FLAGS.workdir,
      'step': predictor.step,
      'score_threshold': FLAGS.score_threshold,
      'predictions': predictions,
      'errors': problems,
    },
  )
  print(f'{len(predictions)} image(s) predicted, {len(problems)} left out: {output}')
  return problems


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give one or more image files or folders')
  launch.quiet_logs()
  with launch.one_line_errors():
    if workdir_lib.load_config(FLAGS.workdir).task == 'detection':
      if detect(argv[1:]):
        sys.exit(1)
      return
    config, variables, step = trained.load(FLAGS.workdir, FLAGS.step, FLAGS.weights)
    files, images, problems = trained.read_images(argv[1:], config)
    for path, why in problems.items():
      print(f'ERROR {path}: {why}', file=sys.stderr)
    probabilities = trained.predict(config, variables, images)
    names = data_sources.class_names(config.input) or []
    names += [str(c) for c in range(len(names), config.num_classes)]  # Unnamed classes: ids.
    predictions = []
    for path, p in zip(files, probabilities):
      top = p.argsort()[::-1][: FLAGS.top_k]
      predictions.append(
        {
          'file': path,
          'top': [{'label': int(c), 'class': names[c], 'probability': float(p[c])} for c in top],
        }
      )
      # Entries apart by '; ': ImageNet's class names hold commas ('rule, ruler').
      print(
        f'{path}: '
        + '; '.join(f'{t["class"]} {t["probability"]:.3f}' for t in predictions[-1]['top'])
      )
    output = paths.unused_path(FLAGS.output or str(paths.path(FLAGS.workdir) / 'predictions.json'))
    paths.write_json(
      output,
      {
        'workdir': FLAGS.workdir,
        'step': step,
        'weights': FLAGS.weights,
        'predictions': predictions,
        'errors': problems,
      },
    )
    print(f'{len(predictions)} image(s) predicted, {len(problems)} left out: {output}')
  if problems:
    sys.exit(1)


if __name__ == '__main__':
  launch.run(main)
