"""Offline detection data: the bundled handwritten digits pasted at random places and scales on
larger canvases, each with its class, box and pixel mask, so the detection wing trains and is
evaluated on a fresh machine with no download (the role `digits.py` plays for classification).

A scene is a pure function of (split, index): the same seed gives the same scenes on every
machine. Train scenes use the digits' train split, test scenes its test split (digits.py's
stratified split), so no test digit is ever seen in training.
"""

import functools

import numpy as np
from PIL import Image
from sklearn import datasets
from sklearn import model_selection

from halonet.data import digits

NUM_CLASSES = 10  # Digit d is class d + 1; 0 is the background.
MASK_CROP = 28  # Each mask is kept as a MASK_CROP² crop of its box.
_SCALES = (2, 5)  # A digit is pasted 8 * scale pixels tall, scale drawn from this range.
_INK = 0.25  # A pixel belongs to a digit where its ink is above this share of full ink.


@functools.cache
def _digit_images(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, 8, 8] in 0-1, digits [N]) of digits.py's split."""
  data = datasets.load_digits()
  indices = np.arange(len(data.images))
  train, test = model_selection.train_test_split(
    indices, test_size=digits.TEST_FRACTION, stratify=data.target, random_state=0
  )
  chosen = np.sort(train if split == 'train' else test)
  return data.images[chosen] / 16.0, data.target[chosen]


def scene(split: str, index: int, size: int = 64, max_objects: int = 4) -> dict[str, np.ndarray]:
  """One canvas: 'image' uint8 [size, size, 3] (white ink on a noisy dark ground), 'boxes'
  [max_objects, 4] (x1, y1, x2, y2, tight around the ink), 'classes' [max_objects] (1..10),
  'masks' [max_objects, size, size] bool, 'mask_crops' [max_objects, MASK_CROP, MASK_CROP]
  (each mask over its box) and 'valid' [max_objects]; 1..max_objects digits, two of them sharing
  at most a tenth of the smaller one's pixels."""
  rng = np.random.default_rng([0 if split == 'train' else 1, index])
  images, labels = _digit_images(split)
  canvas = rng.uniform(0, 0.15, (size, size))
  boxes = np.zeros((max_objects, 4), np.float32)
  classes = np.zeros(max_objects, np.int32)
  masks = np.zeros((max_objects, size, size), bool)
  crops = np.zeros((max_objects, MASK_CROP, MASK_CROP), np.float32)
  count = 0
  for _ in range(rng.integers(1, max_objects + 1)):
    pick = rng.integers(len(images))
    side = 8 * int(rng.integers(_SCALES[0], _SCALES[1] + 1))
    side = min(side, size)
    ink = np.asarray(
      Image.fromarray(images[pick].astype(np.float32)).resize((side, side), Image.BILINEAR)
    )
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = ink > _INK
    shared = [(mask & earlier).sum() / min(mask.sum(), earlier.sum()) for earlier in masks[:count]]
    if not mask.any() or max(shared, default=0) > 0.1:
      continue  # It would hide, or be hidden by, an earlier digit too much: left out.
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    region = canvas[top : top + side, left : left + side]
    canvas[top : top + side, left : left + side] = np.maximum(region, ink)
    boxes[count], classes[count], masks[count] = box, labels[pick] + 1, mask
    x1, y1, x2, y2 = box.astype(int)
    crop = Image.fromarray(mask[y1:y2, x1:x2].astype(np.float32))
    crops[count] = np.asarray(crop.resize((MASK_CROP, MASK_CROP), Image.BILINEAR))
    count += 1
  image = np.round(255 * np.clip(canvas, 0, 1)).astype(np.uint8)
  return {
    'image': np.repeat(image[..., None], 3, axis=-1),
    'boxes': boxes,
    'classes': classes,
    'masks': masks,
    'mask_crops': crops,
    'valid': np.arange(max_objects) < count,
  }


def batch(split: str, indices: range | list[int], **kwargs) -> dict[str, np.ndarray]:
  """scene() of each index, stacked."""
  scenes = [scene(split, i, **kwargs) for i in indices]
  return {k: np.stack([s[k] for s in scenes]) for k in scenes[0]}
