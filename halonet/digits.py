"""Offline quick-start data: scikit-learn's bundled handwritten digits as an image folder.

`load_digits` ships 1,797 real 8x8 scans inside scikit-learn, so the whole pipeline (TFDS
ImageFolder, augmentation, sharding) can be exercised without a download.
"""

import os
import shutil
import tempfile

import numpy as np
from PIL import Image
from sklearn import datasets
from sklearn import model_selection

DEFAULT_ROOT = os.path.join('~', '.cache', 'halonet', 'digits')
NUM_EXAMPLES = 1797
TEST_FRACTION = 0.2  # 1,437 train / 360 test.
_SPLIT_SEED = 0


def prepare_digits(root: str) -> str:
  """Writes `root/{train,test}/<class>/<idx>.png` once; returns `root`.

  A finished folder is left untouched, and it is built in a sibling temp dir and renamed into
  place, so an interrupted run never leaves a half-written folder that looks complete.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if _is_complete(root):
    return root
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.digits-', dir=parent)
  try:
    _write(tmp)
    if os.path.isdir(root):  # An incomplete leftover (e.g. deleted files): replace it.
      shutil.rmtree(root)
    try:
      os.rename(tmp, root)
    except OSError:
      # Another process won the race; its folder is complete, so ours is redundant.
      if not _is_complete(root):
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return root


def _is_complete(root: str) -> bool:
  """True when both splits exist and together hold every digit image."""
  count = 0
  for split in ('train', 'test'):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      return False
    for label in os.listdir(split_dir):
      count += len(os.listdir(os.path.join(split_dir, label)))
  return count == NUM_EXAMPLES


def _write(root: str) -> None:
  """Stratified, seeded split; 0..16 intensities scaled to 0..255 grayscale PNGs."""
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  indices = np.arange(len(images))
  train_idx, test_idx = model_selection.train_test_split(
      indices, test_size=TEST_FRACTION, stratify=digits.target, random_state=_SPLIT_SEED)
  for split, split_idx in (('train', train_idx), ('test', test_idx)):
    for idx in sorted(split_idx):
      label_dir = os.path.join(root, split, str(digits.target[idx]))
      os.makedirs(label_dir, exist_ok=True)
      Image.fromarray(images[idx]).save(os.path.join(label_dir, f'{idx}.png'))
