"""Offline quick-start data: scikit-learn's bundled handwritten digits as an image folder.

`load_digits` ships 1,797 real 8x8 scans inside scikit-learn, so the whole pipeline (TFDS
ImageFolder, augmentation, sharding) can be exercised without a download.

Dataset names: 'digits' (all ten classes), or 'digits/A-B' for the digits A..B only (e.g.
'digits/0-4' and 'digits/5-9' for pre-training on some classes and fine-tuning on the others);
labels are numbered from 0 in digit order.
"""

import os
import re
import shutil
import tempfile

import numpy as np
from PIL import Image
from sklearn import datasets
from sklearn import model_selection

from halonet import errors

NAME = 'digits'
DEFAULT_ROOT = os.path.join('~', '.cache', 'halonet', 'digits')
NUM_EXAMPLES = 1797
TEST_FRACTION = 0.2  # 1,437 train / 360 test.
_SPLIT_SEED = 0


def classes_of(dataset: str) -> tuple[int, ...] | None:
  """The digits a dataset name selects, or None when it is not a digits dataset."""
  if dataset == NAME:
    return tuple(range(10))
  match = re.fullmatch(rf'{NAME}/(\d)-(\d)', dataset)
  if match and int(match[1]) <= int(match[2]):
    return tuple(range(int(match[1]), int(match[2]) + 1))
  return None


def default_root(dataset: str) -> str:
  """Where a digits dataset is written unless config.input.data_dir says otherwise."""
  classes = classes_of(dataset)
  if classes == tuple(range(10)):
    return DEFAULT_ROOT
  return f'{DEFAULT_ROOT}_{classes[0]}-{classes[-1]}'


def prepare_digits(root: str, classes: tuple[int, ...] = tuple(range(10))) -> str:
  """Writes `root/{train,test}/<class>/<idx>.png` (only `classes`) once; returns `root`.

  A finished folder is left untouched, and it is built in a sibling temp dir and renamed into
  place, so an interrupted run never leaves a half-written folder that looks complete.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if _is_complete(root, classes):
    return root
  found = _class_folders(root)
  if found and found != sorted(map(str, classes)):  # Another digits subset, or not digits.
    raise errors.ConfigError(
      f'{root} holds the classes {found}, not the digits {list(classes)}; give another '
      f'--config.input.data_dir (or none) for this dataset'
    )
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.digits-', dir=parent)
  try:
    _write(tmp, classes)
    if os.path.isdir(root):  # An incomplete leftover (e.g. deleted files): replace it.
      shutil.rmtree(root)
    try:
      os.rename(tmp, root)
    except OSError:
      # Another process won the race; its folder is complete, so ours is redundant.
      if not _is_complete(root, classes):
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return root


def _class_folders(root: str) -> list[str]:
  """The class folders of either split already under `root`."""
  return sorted(
    {
      label
      for split in ('train', 'test')
      if os.path.isdir(os.path.join(root, split))
      for label in os.listdir(os.path.join(root, split))
    }
  )


def _is_complete(root: str, classes: tuple[int, ...]) -> bool:
  """True when both splits exist, hold exactly `classes` and every image of them."""
  count = 0
  for split in ('train', 'test'):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir) or sorted(os.listdir(split_dir)) != sorted(map(str, classes)):
      return False
    for label in os.listdir(split_dir):
      count += len(os.listdir(os.path.join(split_dir, label)))
  return count == int(np.isin(datasets.load_digits().target, classes).sum())


def _write(root: str, classes: tuple[int, ...]) -> None:
  """Stratified, seeded split (the same for every class subset); 0..16 intensities scaled to
  0..255 grayscale PNGs."""
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  indices = np.arange(len(images))
  train_idx, test_idx = model_selection.train_test_split(
    indices, test_size=TEST_FRACTION, stratify=digits.target, random_state=_SPLIT_SEED
  )
  for split, split_idx in (('train', train_idx), ('test', test_idx)):
    for idx in sorted(split_idx):
      if digits.target[idx] not in classes:
        continue
      label_dir = os.path.join(root, split, str(digits.target[idx]))
      os.makedirs(label_dir, exist_ok=True)
      Image.fromarray(images[idx]).save(os.path.join(label_dir, f'{idx}.png'))
