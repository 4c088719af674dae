"""A detection run put to use: its detections on any images, in each image's own pixels (boxes,
classes, scores and full-size masks), and those drawn on the image as a PNG. What predict.py runs
on a detection workdir."""

from collections.abc import Sequence
from typing import Any

import jax
import matplotlib

matplotlib.use('Agg')  # Files only: no display is needed, or present on a TPU VM.
from matplotlib import patches  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from PIL import UnidentifiedImageError  # noqa: E402

from halonet import paths  # noqa: E402
from halonet import sharding  # noqa: E402
from halonet.detection import checks  # noqa: E402
from halonet.detection import coco_eval  # noqa: E402
from halonet.detection import data as data_lib  # noqa: E402
from halonet.detection import evaluation  # noqa: E402
from halonet.detection import train_step as step_lib  # noqa: E402
from halonet.train import checkpointing  # noqa: E402
from halonet.train import optim  # noqa: E402
from halonet.train import workdir as workdir_lib  # noqa: E402

BATCH = 8  # Images per compiled call; the last call is padded.


class Predictor:
  """A run's detector and the weights of one of its checkpoints, read-only."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
    checks.validate_task(config)
    self.config = config.copy_and_resolve_references()
    self.config.eval_batch_size = BATCH
    self.mesh = sharding.create_mesh((1, 1), jax.local_devices()[:1])
    detector = evaluation.detector_of(self.config)
    tx = optim.create_optimizer(self.config, lambda _: 0.0)
    _, abstract = step_lib.abstract_state(self.config, detector, tx, self.mesh)
    manager = checkpointing.create_manager(workdir, 1, read_only=True)
    try:
      _, self.state = checkpointing.restore_readable(manager, abstract, step)
    finally:
      manager.close()
    self.step = int(self.state.step)
    self._infer = step_lib.make_infer(self.config, detector, self.mesh)

  def detect(
    self, images: Sequence[np.ndarray], score_threshold: float = 0.5
  ) -> list[dict[str, np.ndarray]]:
    """Each image's detections scoring at least `score_threshold`, best first: 'boxes' [D, 4]
    (x1, y1, x2, y2 in the image's pixels), 'scores', 'classes' (1..K), 'masks' [D, H, W]."""
    config = self.config
    pad = data_lib.pad_pixel(config.input)
    found = []
    for start in range(0, len(images), BATCH):
      chunk = list(images[start : start + BATCH])
      prepared = [
        data_lib.prepared(
          {
            'image': image,
            'boxes': np.zeros((0, 4), np.float32),
            'classes': np.zeros(0, np.int32),
            'masks': np.zeros((0, *image.shape[:2]), bool),
            'image_id': 0,
          },
          config.image_size,
          1,
          pad,
        )
        for image in chunk + chunk[:1] * (BATCH - len(chunk))
      ]
      batch = {k: np.stack([p[k] for p in prepared]) for k in step_lib.INFER_BATCH_KEYS}
      out = jax.device_get(
        self._infer(
          self.state.params, self.state.batch_stats, sharding.shard_batch(batch, self.mesh)
        )
      )
      for i, image in enumerate(chunk):
        kept = out['valid'][i] & (out['scores'][i] >= score_threshold)
        boxes = out['boxes'][i][kept] / np.tile(prepared[i]['scale'], 2)
        height, width = image.shape[:2]
        found.append(
          {
            'boxes': boxes,
            'scores': out['scores'][i][kept],
            'classes': out['classes'][i][kept],
            'masks': coco_eval.paste_masks(out['masks'][i][kept], boxes, height, width),
          }
        )
    return found


def read_images(image_paths: Sequence[str]) -> tuple[list[str], list[np.ndarray], dict[str, str]]:
  """(files, RGB uint8 images at their own size, {file: why it was left out}) for files and
  folders (every file under them, sorted), local or URLs."""
  files, problems = paths.expand_files(image_paths)
  good, images = [], []
  for name in files:
    try:
      with paths.path(name).open('rb') as f:
        images.append(np.asarray(Image.open(f).convert('RGB')))
      good.append(name)
    except UnidentifiedImageError:
      problems[name] = 'not a decodable image'
    except OSError as e:  # A truncated file, an unreadable one.
      problems[name] = f'not a decodable image ({e})'
  return good, images, problems


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """Names of classes 1..K: the digits, COCO's categories (from the validation annotations when
  they are at hand), else the class numbers."""
  if config.input.dataset == data_lib.DIGIT_SCENES:
    return [str(k - 1) for k in range(1, config.num_classes + 1)]
  annotations = paths.path(config.input.data_dir or '.') / 'annotations' / 'instances_val2017.json'
  if config.input.dataset == data_lib.COCO and annotations.exists():
    categories = sorted(paths.read_json(annotations)['categories'], key=lambda c: c['id'])
    return [c['name'] for c in categories]
  return [f'class {k}' for k in range(1, config.num_classes + 1)]


def draw(image: np.ndarray, found: dict[str, np.ndarray], names: Sequence[str]) -> Figure:
  """The image with each detection's mask (tinted), box and 'class score' label."""
  height, width = image.shape[:2]
  figure = plt.figure(figsize=(8, 8 * height / width), dpi=max(100, width // 8))
  axes = figure.add_axes((0, 0, 1, 1))
  axes.imshow(image)
  colours = plt.get_cmap('tab10')
  tint = np.zeros((height, width, 4))
  for d, (box, score, cls, mask) in enumerate(
    zip(found['boxes'], found['scores'], found['classes'], found['masks'])
  ):
    colour = colours(d % 10)
    tint[mask] = (*colour[:3], 0.45)
    x1, y1, x2, y2 = box
    axes.add_patch(
      patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5)
    )
    axes.text(
      x1,
      y1,
      f'{names[int(cls) - 1]} {score:.2f}',
      color='white',
      fontsize=8,
      va='bottom',
      bbox={'facecolor': colour, 'alpha': 0.8, 'pad': 1, 'edgecolor': 'none'},
    )
  axes.imshow(tint)
  axes.set_axis_off()
  return figure


def as_json(file: str, found: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, Any]:
  """One image's detections for predictions' JSON: boxes, classes, scores; masks as COCO's
  run-length encoding."""
  results = coco_eval.results(0, found['boxes'], found['scores'], found['classes'], found['masks'])
  return {
    'file': file,
    'detections': [
      {
        'class': names[r['category_id'] - 1],
        'label': r['category_id'],
        'score': r['score'],
        'box_xyxy': [float(v) for v in box],
        'mask_rle': r['segmentation'],
      }
      for r, box in zip(results, found['boxes'])
    ],
  }


def write_drawing(figure: Figure, target: str) -> str:
  """Saves `figure` as a PNG at `target`, or beside it if taken (never replacing a file)."""
  target = paths.unused_path(target)
  paths.save_figure(figure, target)
  plt.close(figure)
  return target


def load(workdir: str, step: int | None = None, config: Any = None) -> Predictor:
  """The Predictor of `workdir`'s run (its own config.json unless `config`)."""
  if config is None:
    config = workdir_lib.load_config(workdir)
  return Predictor(config, workdir, step)
