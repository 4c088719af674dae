"""Where examples come from: a TFDS dataset, an image folder or the offline digits (config.input).

Each process reads its own disjoint shard of a split, still encoded, so skipped and unused
examples are never decoded. What can be checked before training is checked here, in one line
naming the cause: data that is not prepared, files that are not images, a dataset with more
classes than the model, a label the model has no output for.
"""

from halonet.data.tensorflow_import import tf  # First: tfds imports TensorFlow.

# isort: split

import difflib
import functools
import os
import re

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from halonet import errors
from halonet import paths
from halonet.data import digits
from halonet.data import imagenet_classes

FOLDER_DATASETS = ('image_folder', digits.NAME)  # Also digits.NAME/A-B.
REAL_LABELS = 'real_label'  # imagenet2012_real's label set of each image (maybe empty).


def is_folder(dataset: str) -> bool:
  """Whether `dataset` is read from an image folder (its own or the prepared digits)."""
  return dataset == FOLDER_DATASETS[0] or digits.classes_of(dataset) is not None


def num_examples(data: ml_collections.ConfigDict, split: str, num_classes: int) -> int:
  """Examples in `split` over all processes, undecodable files left out (config.input).

  TFDS metadata when it has the split; otherwise (e.g. under `tfds.testing.mock_data`, whose
  `info.splits` is empty) the encoded examples are counted, which skips all decoding.
  """
  builder = _builder(data, split)
  try:
    total = builder.info.splits[split].num_examples
  except KeyError:
    ds = read(data, split, num_classes, 0, 1, shuffle_seed=None)
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  return total - len(_skipped_images(data, builder, split))


def class_names(data: ml_collections.ConfigDict) -> list[str] | None:
  """The dataset's class names (an image folder's sub-folder names; ImageNet's WordNet IDs as
  their lemmas), or None where the dataset is not on this machine or has none."""
  try:
    label = _builder(data, data.train_split).info.features['label']
  except (FileNotFoundError, errors.ConfigError, tfds.core.DatasetNotFoundError):
    return None
  names = getattr(label, 'names', None)
  return imagenet_classes.readable(list(names) if names else None)


def check_num_classes(data: ml_collections.ConfigDict, split: str, num_classes: int) -> None:
  """Refuses a config.num_classes below the dataset's class count, which would turn the labels
  beyond it into all-zero targets and train silently on them."""
  label = _builder(data, split).info.features['label']
  classes = getattr(label, 'num_classes', None)
  if classes is not None and classes > num_classes:
    raise errors.ConfigError(
      f'config.num_classes={num_classes} is smaller than the {classes} classes of {data.dataset}'
    )


def read(
  data: ml_collections.ConfigDict,
  split: str,
  num_classes: int,
  process_index: int,
  process_count: int,
  shuffle_seed: int | None,
) -> tf.data.Dataset:
  """Still-encoded {'image', 'label'} of this process's disjoint shard, in a seeded order.

  TFDS datasets read only their own files (`even_splits`); ImageFolder has no sub-split API,
  so every process lists the folder and keeps every `process_count`-th file (its files are
  read, not decoded, before the shard). `shuffle_seed` shuffles TFDS file order (None: fixed).
  A label of no class below `num_classes` stops the read naming it.
  """
  builder = _builder(data, split)
  decoders = {'image': tfds.decode.SkipDecoding()}
  if is_folder(data.dataset):
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    bad = _skipped_images(data, builder, split)
    if bad:
      ds = ds.filter(lambda ex: tf.reduce_all(ex['image/filename'] != tf.constant(bad)))
    ds = ds.shard(process_count, process_index)
  else:
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, skip_prefetch=True)
    try:
      ds = builder.as_dataset(
        split=tfds.even_splits(split, process_count)[process_index],
        shuffle_files=shuffle_seed is not None,
        decoders=decoders,
        read_config=read_config,
      )
    except AssertionError as e:  # TFDS signals "not prepared" with an assert.
      raise FileNotFoundError(_missing_message(data, builder)) from e
  return ds.map(functools.partial(_checked_label, num_classes=num_classes))


def _builder(data: ml_collections.ConfigDict, split: str) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `data.dataset`; folders are checked before anything is read."""
  classes = digits.classes_of(data.dataset)
  if classes:
    root = data.data_dir or digits.default_root(data.dataset)
    return _folder_builder(digits.prepare_digits(root, classes))
  if data.dataset == 'image_folder':
    split_dir = str(paths.path(data.data_dir or '.') / split)
    if not data.data_dir or not paths.path(split_dir).is_dir():
      raise FileNotFoundError(
        f'image_folder: no directory {split_dir!r}; set --config.input.data_dir to a folder '
        f'with <split>/<class>/<image> files.'
      )
    return _folder_builder(paths.as_string(data.data_dir))
  try:
    return tfds.builder(data.dataset, data_dir=data.data_dir or None)
  except tfds.core.DatasetNotFoundError as e:  # Its message lists every TFDS dataset.
    known = re.findall(r'^\t- (\S+)$', str(e), re.MULTILINE)
    close = difflib.get_close_matches(data.dataset.split('/')[0].split(':')[0], known, n=3)
    hint = f'; did you mean {" or ".join(close)}?' if close else ''
    raise errors.ConfigError(
      f'config.input.dataset={data.dataset!r} is not a TFDS dataset, '
      f'{FOLDER_DATASETS[0]!r} or {FOLDER_DATASETS[1]!r}{hint}'
    ) from None


@functools.cache
def _folder_builder(root: str) -> tfds.core.DatasetBuilder:
  """ImageFolder lists every file when built: once per folder and process."""
  return tfds.ImageFolder(root)


@functools.cache
def undecodable_images(root: str, split: str) -> tuple[str, ...]:
  """The files of an image folder's split that TensorFlow cannot decode (truncated, not images).

  Each file is decoded once, in parallel, the first time a process reads the split; the names
  are looked up in a second, read-only pass only when some failed.
  """
  builder = _folder_builder(root)
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  decode = lambda ex: (
    tf.shape(tf.io.decode_image(ex['image'], channels=3, expand_animations=False)),
    ex['image/filename'],
  )
  good = {
    name
    for _, name in ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    .ignore_errors()
    .as_numpy_iterator()
  }
  if len(good) == builder.info.splits[split].num_examples:
    return ()
  names = ds.map(lambda ex: ex['image/filename']).as_numpy_iterator()
  return tuple(sorted(name.decode() for name in names if name not in good))


def _skipped_images(
  data: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, split: str
) -> tuple[str, ...]:
  """The undecodable files of a folder split: refused, or (data.skip_bad_images) left out."""
  if not is_folder(data.dataset):
    return ()
  bad = undecodable_images(builder.data_dir, split)
  if bad and not data.skip_bad_images:
    listed = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
    raise errors.ConfigError(
      f'{len(bad)} file(s) in {os.path.join(builder.data_dir, split)} cannot be '
      f'decoded as images: {listed}; remove them or set '
      f'--config.input.skip_bad_images=True'
    )
  if bad:
    _warn_skipped(bad)
  return bad


@functools.cache
def _warn_skipped(bad: tuple[str, ...]) -> None:
  for name in bad:
    logging.warning('skipping %s: not a decodable image', name)
  logging.warning('skipping %d undecodable image file(s) in all', len(bad))


def _checked_label(ex: dict[str, tf.Tensor], num_classes: int) -> dict[str, tf.Tensor]:
  """Image and label (ImageNet-ReaL's original one; its label sets too), failing naming the
  label when it is not a class of the model."""
  label = ex['label'] if 'label' in ex else ex['original_label']
  check = tf.debugging.assert_less(
    label,
    tf.cast(num_classes, label.dtype),
    message=(f'a label is not below config.num_classes={num_classes}'),
    summarize=1,
  )
  with tf.control_dependencies([check]):
    checked = {'image': ex['image'], 'label': tf.identity(label)}
  if REAL_LABELS in ex:
    checked[REAL_LABELS] = ex[REAL_LABELS]
  return checked


def _missing_message(data: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder) -> str:
  data_dir = data.data_dir or '~/tensorflow_datasets'
  manual = data.manual_dir or os.path.join(data_dir, 'downloads', 'manual')
  how = f'`tfds build {data.dataset} --data_dir={data_dir}`'
  if data.dataset.startswith('imagenet2012'):  # ReaL and ImageNet-C are built from the val tar.
    tars = 'ILSVRC2012_img_train.tar and ' if data.dataset == 'imagenet2012' else ''
    how = (
      f'download {tars}ILSVRC2012_img_val.tar by hand into {manual}, then run '
      f'`tfds build {data.dataset} --data_dir={data_dir} --manual_dir={manual}`'
    )
  return f'{data.dataset}: no prepared data in {builder.data_dir}; {how}.'
