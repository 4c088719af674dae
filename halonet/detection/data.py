"""Detection data: the offline digit scenes or COCO in its own layout, each image resized (with
large-scale jitter and flips in training) and cropped or padded to one square canvas, its objects'
boxes moved with it and each mask kept as a crop of its box.

COCO is read from the files COCO publishes (`DATA_DIR/annotations/instances_val2017.json` beside
`DATA_DIR/val2017/*.jpg`, local or in a bucket), not from TFDS: TFDS's `coco/2017` has boxes but
no instance masks. Crowd regions are left out of training and kept in evaluation, where
pycocotools ignores detections on them, as COCO scores.

Batches are a pure function of (seed, global example index): a resumed run reads the same
images with the same jitter, and each process reads its own share of every global batch.
"""

from collections.abc import Iterator, Sequence
import concurrent.futures
import contextlib
import functools
import io
import itertools
import os
from typing import Any, Protocol

from absl import logging
import ml_collections
import numpy as np
from PIL import Image
from pycocotools import coco

from halonet import errors
from halonet import paths
from halonet.data import digit_scenes
from halonet.detection import coco_eval

DIGIT_SCENES = 'digit_scenes'
COCO = 'coco'
DATASETS = (DIGIT_SCENES, COCO)
DIGIT_SCENE_SPLITS = {'train': 4096, 'test': 500}  # Scenes per split (any index is a scene).
COCO_SPLITS = {'train': 'train2017', 'validation': 'val2017'}  # Other names are used as given.
MASK_CROP = digit_scenes.MASK_CROP
_BOX_TOLERANCE = 1.0  # Pixels a COCO box may stick out of its image (its rounding).


class Source(Protocol):
  """A split's images with their objects, in the images' own pixels."""

  category_ids: list[int]  # Class k (1..K) is category_ids[k - 1] in the ground truth.

  def __len__(self) -> int: ...

  def example(self, index: int) -> dict[str, np.ndarray]:
    """'image' uint8 [H, W, 3], 'boxes' [N, 4] (x1, y1, x2, y2), 'classes' [N] (1..K), 'masks'
    [N, H, W] bool, 'image_id'."""

  def truth(self) -> dict[str, Any]:
    """The split's ground truth as a COCO annotation file's content."""


class DigitScenes:
  """digit_scenes.py's canvases, `size` pixels square."""

  def __init__(self, split: str, size: int):
    if split not in DIGIT_SCENE_SPLITS:
      raise errors.ConfigError(
        f'split {split!r} of {DIGIT_SCENES} is not one of {list(DIGIT_SCENE_SPLITS)}'
      )
    self.split, self.size = split, size
    self.category_ids = list(range(1, digit_scenes.NUM_CLASSES + 1))

  def __len__(self) -> int:
    return DIGIT_SCENE_SPLITS[self.split]

  def example(self, index: int) -> dict[str, np.ndarray]:
    scene = digit_scenes.scene(self.split, index, size=self.size)
    valid = scene['valid']
    return {
      'image': scene['image'],
      'boxes': scene['boxes'][valid],
      'classes': scene['classes'][valid],
      'masks': scene['masks'][valid],
      'image_id': index,
    }

  def truth(self) -> dict[str, Any]:
    scenes = digit_scenes.batch(self.split, range(len(self)), size=self.size)
    return coco_eval.ground_truth(
      scenes['boxes'], scenes['classes'], scenes['masks'], scenes['valid'], len(self.category_ids)
    )


class CocoFiles:
  """A COCO split as COCO publishes it: one annotation file and a folder of images."""

  def __init__(self, data_dir: str, split: str, *, train: bool, skip_bad: bool):
    folder = COCO_SPLITS.get(split, split)
    root = paths.path(data_dir or '.')
    annotations = root / 'annotations' / f'instances_{folder}.json'
    self.images_dir = root / folder
    if not annotations.exists():
      raise FileNotFoundError(
        f'no {paths.as_string(annotations)}: config.input.data_dir must hold COCO as '
        f'cocodataset.org publishes it (annotations/instances_{folder}.json and {folder}/)'
      )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it indexes.
      self.api = coco.COCO()
      self.api.dataset = paths.read_json(annotations)
      self.api.createIndex()
    self.where = paths.as_string(annotations)
    self.category_ids = sorted(self.api.cats)
    self._class_of = {c: k + 1 for k, c in enumerate(self.category_ids)}
    self._skip_bad, self._train = skip_bad, train
    self._bad = set(self._checked())
    ids = sorted(self.api.imgs)
    if train:  # As detectron2 and torchvision: an image with no object to learn is left out.
      ids = [i for i in ids if self._objects(i)]
    self.image_ids = ids

  def _problem(self, annotation: dict[str, Any]) -> str | None:
    image = self.api.imgs.get(annotation['image_id'])
    if image is None:
      return f'image_id {annotation["image_id"]} is not among the images'
    if annotation['category_id'] not in self.api.cats:
      return f'category_id {annotation["category_id"]} is not among the categories'
    x, y, w, h = annotation['bbox']
    if w <= 0 or h <= 0:
      return f'bbox {annotation["bbox"]} is empty'
    t = _BOX_TOLERANCE
    if x < -t or y < -t or x + w > image['width'] + t or y + h > image['height'] + t:
      return (
        f'bbox {annotation["bbox"]} lies outside its {image["width"]} x {image["height"]} image'
      )
    return None

  def _refuse(self, annotation_id: int, problem: str) -> None:
    message = f'{self.where}: annotation {annotation_id}: {problem}'
    if not self._skip_bad:
      raise errors.ConfigError(
        f'{message}; fix the file, or leave such annotations out with '
        '--config.input.skip_bad_images=True'
      )
    logging.warning('%s: left out', message)

  def _checked(self) -> Iterator[int]:
    """The ids of the bad annotations (each refused, or named in a warning and left out)."""
    for annotation in self.api.dataset.get('annotations', []):
      problem = self._problem(annotation)
      if problem:
        self._refuse(annotation['id'], problem)
        yield annotation['id']

  def _objects(self, image_id: int) -> list[dict[str, Any]]:
    """The image's annotations a detector learns from: not crowd, not bad."""
    return [
      a
      for a in self.api.imgToAnns.get(image_id, [])
      if not a.get('iscrowd', 0) and a['id'] not in self._bad
    ]

  def __len__(self) -> int:
    return len(self.image_ids)

  def example(self, index: int) -> dict[str, np.ndarray]:
    image_id = self.image_ids[index]
    info = self.api.imgs[image_id]
    with (self.images_dir / info['file_name']).open('rb') as f:
      image = np.asarray(Image.open(f).convert('RGB'))
    boxes, classes, masks = [], [], []
    for annotation in self._objects(image_id) if self._train else []:
      mask = self.api.annToMask(annotation).astype(bool)
      if not mask.any():
        self._refuse(annotation['id'], 'its segmentation covers no pixel')
        continue
      x, y, w, h = annotation['bbox']
      boxes.append([x, y, x + w, y + h])
      classes.append(self._class_of[annotation['category_id']])
      masks.append(mask)
    height, width = image.shape[:2]
    return {
      'image': image,
      'boxes': np.asarray(boxes, np.float32).reshape(-1, 4),
      'classes': np.asarray(classes, np.int32),
      'masks': np.asarray(masks, bool).reshape(-1, height, width),
      'image_id': image_id,
    }

  def truth(self) -> dict[str, Any]:
    return self.api.dataset


def source(config: ml_collections.ConfigDict, split: str, *, train: bool) -> Source:
  """config.input's `split`, checked to hold config.num_classes classes."""
  data = config.input
  if data.dataset == DIGIT_SCENES:
    images = DigitScenes(split, config.image_size)
  elif data.dataset == COCO:
    images = CocoFiles(data.data_dir, split, train=train, skip_bad=data.skip_bad_images)
  else:
    raise errors.ConfigError(
      f'config.input.dataset={data.dataset!r} is not a detection dataset; expected one of '
      f'{list(DATASETS)}'
    )
  if len(images.category_ids) != config.num_classes:
    raise errors.ConfigError(
      f'config.num_classes={config.num_classes}, but split {split!r} of {data.dataset} has '
      f'{len(images.category_ids)} classes'
    )
  return images


def crop_mask(mask: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
  """[size, size] float: `mask` [H, W] read bilinearly at the centres of a size x size grid over
  `box` (x1, y1, x2, y2, in the mask's pixels), as RoIAlign reads a map."""
  height, width = mask.shape
  x1, y1, x2, y2 = box
  xs = np.clip(x1 + (np.arange(size) + 0.5) * (x2 - x1) / size - 0.5, 0, width - 1)
  ys = np.clip(y1 + (np.arange(size) + 0.5) * (y2 - y1) / size - 0.5, 0, height - 1)
  x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
  x1_, y1_ = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
  fx, fy = (xs - x0)[None, :], (ys - y0)[:, None]
  m = mask.astype(np.float32)
  return (
    m[y0][:, x0] * (1 - fy) * (1 - fx)
    + m[y0][:, x1_] * (1 - fy) * fx
    + m[y1_][:, x0] * fy * (1 - fx)
    + m[y1_][:, x1_] * fy * fx
  )


def prepared(
  example: dict[str, np.ndarray],
  size: int,
  max_objects: int,
  pad_pixel: Sequence[int],
  rng: np.random.Generator | None = None,
  scale_range: tuple[float, float] = (1.0, 1.0),
  flip: bool = False,
) -> dict[str, np.ndarray]:
  """One example on a size x size canvas. Without `rng` (evaluation): resized so its longer side
  is `size`, at the top left. With it (training, large-scale jitter): flipped half the time if
  `flip`, resized to a share of that drawn from `scale_range`, and a random size x size window
  of it taken (padding where it is smaller); the objects left with a box of at least a pixel
  each way are kept, the first `max_objects` of them. 'image_size' is the (height, width) of the
  image on the canvas, 'scale' the (x, y) factor from the source's pixels to the canvas's."""
  image, boxes, masks = example['image'], example['boxes'], example['masks']
  height, width = image.shape[:2]
  if rng is not None and flip and rng.random() < 0.5:
    image, masks = image[:, ::-1], masks[:, :, ::-1]
    boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
  share = 1.0 if rng is None else rng.uniform(*scale_range)
  scale = share * size / max(height, width)
  new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
  resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h)))
  top = 0 if rng is None else int(rng.integers(0, max(new_h - size, 0) + 1))
  left = 0 if rng is None else int(rng.integers(0, max(new_w - size, 0) + 1))
  window = resized[top : top + size, left : left + size]
  canvas = np.empty((size, size, 3), np.uint8)
  canvas[...] = np.asarray(pad_pixel, np.uint8)
  canvas[: window.shape[0], : window.shape[1]] = window
  factors = np.array([new_w / width, new_h / height] * 2, np.float32)
  offset = np.array([left, top] * 2, np.float32)
  limits = np.array([window.shape[1], window.shape[0]] * 2, np.float32)
  moved = np.clip(boxes * factors - offset, 0, limits)
  kept = np.flatnonzero((moved[:, 2] - moved[:, 0] >= 1) & (moved[:, 3] - moved[:, 1] >= 1))
  kept = kept[:max_objects]
  out_boxes = np.zeros((max_objects, 4), np.float32)
  classes = np.zeros(max_objects, np.int32)
  crops = np.zeros((max_objects, MASK_CROP, MASK_CROP), np.float32)
  for slot, k in enumerate(kept):
    out_boxes[slot], classes[slot] = moved[k], example['classes'][k]
    crops[slot] = crop_mask(masks[k], (moved[k] + offset) / factors, MASK_CROP)
  return {
    'image': canvas,
    'image_size': np.array(window.shape[:2], np.int32),
    'boxes': out_boxes,
    'classes': classes,
    'mask_crops': crops,
    'valid': np.arange(max_objects) < len(kept),
    'image_id': np.int64(example['image_id']),
    'scale': factors[:2],
  }


def pad_pixel(data: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """The uint8 colour of the canvas outside the image: the pixel mean, which the model sees as 0."""
  return tuple(int(round(255 * m)) for m in data.pixel_mean)


def _stacked(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@functools.lru_cache(maxsize=4)
def _order(seed: int, epoch: int, count: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, count]).permutation(count)


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  """Decoding and resizing release the GIL: threads use every core."""
  return concurrent.futures.ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1))


def train_batches(
  config: ml_collections.ConfigDict,
  images: Source,
  *,
  start_step: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of each global batch from `start_step` on: the global batch of step s
  holds examples s * batch_size ... + batch_size of an endless sequence of epochs, each a
  permutation of the split drawn from (seed, epoch)."""
  local = config.batch_size // process_count
  count = len(images)

  def one(position: int) -> dict[str, np.ndarray]:
    epoch, at = divmod(position, count)
    return prepared(
      images.example(int(_order(config.seed, epoch, count)[at])),
      config.image_size,
      config.detection.max_objects,
      pad_pixel(config.input),
      rng=np.random.default_rng([config.seed, position]),
      scale_range=tuple(config.detection.scale_range),
      flip=config.input.random_flip,
    )

  with _pool() as pool:
    for step in itertools.count(start_step):
      first = step * config.batch_size + process_index * local
      yield _stacked(list(pool.map(one, range(first, first + local))))


def eval_batches(
  config: ml_collections.ConfigDict,
  images: Source,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of each global batch of the whole split, in order; the last batch is
  padded with copies of the split's first image marked 'real' False."""
  batch, local = config.eval_batch_size, config.eval_batch_size // process_count
  count = len(images)
  size, pad = config.image_size, pad_pixel(config.input)

  def one(position: int) -> dict[str, np.ndarray]:
    example = prepared(
      images.example(position if position < count else 0),
      size,
      config.detection.max_objects,
      pad,
    )
    return {**example, 'real': np.bool_(position < count)}

  with _pool() as pool:
    for start in range(0, count, batch):
      first = start + process_index * local
      yield _stacked(list(pool.map(one, range(first, first + local))))
