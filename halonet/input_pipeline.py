"""Host input pipeline: TFDS (or an image folder) -> uint8 numpy batches for this process.

The train stream is a pure function of (config.seed, process_index, step): epoch e is shuffled
with seeds derived from (seed, process, e) and every random augmentation draw is keyed on
(seed, process, e, position in the epoch), so `start_step=k` rebuilds the stream from step k by
skipping still-encoded examples. Images stay uint8 until `normalize_images` runs on device.
"""

from halonet.tensorflow_import import tf  # First: keras and tfds import TensorFlow.

# isort: split

from collections.abc import Callable, Iterator
import difflib
import functools
import itertools
import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from halonet import digits
from halonet import errors
from halonet import imagenet_classes
from halonet import paths
from halonet import randaugment

FOLDER_DATASETS = ('image_folder', digits.NAME)  # Also digits.NAME/A-B.
Batch = dict[str, np.ndarray]


def normalize_images(images: jax.Array, config: ml_collections.ConfigDict, dtype: Any) -> jax.Array:
  """uint8 -> `dtype` standardised by the run's pixel_mean and pixel_std; on device, so only
  uint8 crosses the host link."""
  mean = 255 * jnp.asarray(config.pixel_mean, jnp.float32)
  std = 255 * jnp.asarray(config.pixel_std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def is_folder(dataset: str) -> bool:
  """Whether `dataset` is read from an image folder (its own or the prepared digits)."""
  return dataset == FOLDER_DATASETS[0] or digits.classes_of(dataset) is not None


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Examples in `split` over all processes.

  TFDS metadata when it has the split; otherwise (e.g. under `tfds.testing.mock_data`, whose
  `info.splits` is empty) the encoded examples are counted, which skips all decoding.
  """
  builder = _builder(config, split)
  try:
    total = builder.info.splits[split].num_examples
  except KeyError:
    ds = _read(config, builder, split, 0, 1, shuffle_seed=None)
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  return total - len(_skipped_images(config, builder, split))


def class_names(config: ml_collections.ConfigDict) -> list[str] | None:
  """The dataset's class names (an image folder's sub-folder names; ImageNet's WordNet IDs as
  their lemmas), or None where the dataset is not on this machine or has none."""
  try:
    label = _builder(config, config.train_split).info.features['label']
  except (FileNotFoundError, errors.ConfigError, tfds.core.DatasetNotFoundError):
    return None
  names = getattr(label, 'names', None)
  return imagenet_classes.readable(list(names) if names else None)


def check_num_classes(config: ml_collections.ConfigDict, split: str) -> None:
  """Refuses a config.num_classes below the dataset's class count, which would turn the labels
  beyond it into all-zero targets and train silently on them."""
  label = _builder(config, split).info.features['label']
  classes = getattr(label, 'num_classes', None)
  if classes is not None and classes > config.num_classes:
    raise errors.ConfigError(
      f'config.num_classes={config.num_classes} is smaller than the {classes} '
      f'classes of {config.dataset}'
    )


def steps_per_epoch(examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the one place this is counted): the remainder of each
  shuffled epoch is dropped."""
  return examples // global_batch_size


def eval_batch_count(total: int, batch_size: int, process_count: int) -> int:
  """Batches every process yields in one eval pass: the largest process share, in batches."""
  per_process = -(-total // process_count)  # Ceiling divisions.
  return -(-per_process // batch_size)


def create_split(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  train: bool,
  batch_size: int,
  split_size: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  start_step: int = 0,
) -> Iterator[Batch]:
  """Numpy batches of this process's shard of `split`; `batch_size` is per process.

  `split_size`: the split's example count when the caller has it (a run reads it once).

  Yields `image` uint8 [B, s, s, 3] and `label`: int32 [B], or float32 [B, num_classes] mixed
  soft labels when mixup/cutmix is on. Train repeats forever. Eval makes one pass that adds a
  bool `mask` [B]; every process yields the same number of batches (padding is masked), so each
  example is counted exactly once across processes.
  """
  if train and config.dataset.startswith('imagenet_v2'):
    raise errors.ConfigError(f'{config.dataset} has only a test split; use it for eval only.')
  builder = _builder(config, split)
  read = lambda seed: _read(config, builder, split, process_index, process_count, seed)
  total = num_examples(config, split) if split_size is None else split_size
  if not train:
    return _eval_batches(
      config, read(None), batch_size, eval_batch_count(total, batch_size, process_count)
    )
  steps = steps_per_epoch(total, batch_size * process_count)
  if steps == 0:
    raise errors.ConfigError(
      f'{split} of {config.dataset} has {total} examples, fewer than one batch '
      f'of {batch_size} x {process_count} processes.'
    )
  if config.cache:
    cached = read(None).cache()
    read = lambda seed: cached
  make_epoch = functools.partial(
    _epoch, config, read, _train_preprocess(config), batch_size, steps, process_index
  )
  epoch, skip = divmod(start_step, steps)
  # The first epoch is built here, not lazily, so a broken dataset fails at the call.
  return _train_batches(make_epoch(epoch, skip), make_epoch, epoch + 1)


def _train_batches(
  first: tf.data.Dataset, make_epoch: Callable[[int, int], tf.data.Dataset], next_epoch: int
) -> Iterator[Batch]:
  """One tf.data pipeline per epoch, seeded by the epoch, so resuming needs no replay."""
  yield from first.as_numpy_iterator()
  for epoch in itertools.count(next_epoch):
    yield from make_epoch(epoch, 0).as_numpy_iterator()


def _epoch(
  config: ml_collections.ConfigDict,
  read: Callable[[int | None], tf.data.Dataset],
  augment: Callable[..., dict[str, tf.Tensor]],
  batch_size: int,
  steps: int,
  process_index: int,
  epoch: int,
  skip_steps: int,
) -> tf.data.Dataset:
  """Batches `skip_steps..steps` of `epoch`; skipped examples are never decoded."""
  file_seed, shuffle_seed, example_seed, mix_seed = (
    np.random.SeedSequence([config.seed, process_index, epoch]).generate_state(4).tolist()
  )
  ds = read(file_seed).shuffle(config.shuffle_buffer, seed=shuffle_seed)
  ds = ds.take(steps * batch_size).enumerate().skip(skip_steps * batch_size)
  ds = ds.map(
    lambda i, ex: augment(ex, tf.stack([np.int64(example_seed), i])),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(batch_size, drop_remainder=True)
  if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
    ds = ds.enumerate(start=skip_steps).map(
      lambda i, batch: _mix(config, batch, tf.stack([np.int64(mix_seed), i])),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def _eval_batches(
  config: ml_collections.ConfigDict, ds: tf.data.Dataset, batch_size: int, num_batches: int
) -> Iterator[Batch]:
  s = config.image_size
  ds = ds.map(
    lambda ex: {
      'image': eval_image(ex['image'], s, config.crop_fraction),
      'label': tf.cast(ex['label'], tf.int32),
      'mask': True,
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  pad = {'image': tf.zeros([s, s, 3], tf.uint8), 'label': np.int32(0), 'mask': False}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * batch_size).batch(batch_size)
  return iter(_with_options(ds.prefetch(tf.data.AUTOTUNE)).as_numpy_iterator())


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op and a bounded pool, so TF does not oversubscribe the cores JAX uses.
  options.threading.max_intra_op_parallelism = 1
  options.threading.private_threadpool_size = os.cpu_count() or 1
  return ds.with_options(options)


def _builder(config: ml_collections.ConfigDict, split: str) -> tfds.core.DatasetBuilder:
  """The TFDS builder for `config.dataset`; folders are checked before anything is read."""
  classes = digits.classes_of(config.dataset)
  if classes:
    root = config.data_dir or digits.default_root(config.dataset)
    return _folder_builder(digits.prepare_digits(root, classes))
  if config.dataset == 'image_folder':
    split_dir = str(paths.path(config.data_dir or '.') / split)
    if not config.data_dir or not paths.path(split_dir).is_dir():
      raise FileNotFoundError(
        f'image_folder: no directory {split_dir!r}; set --config.data_dir to a folder with '
        f'<split>/<class>/<image> files.'
      )
    return _folder_builder(paths.as_string(config.data_dir))
  try:
    return tfds.builder(config.dataset, data_dir=config.data_dir or None)
  except tfds.core.DatasetNotFoundError as e:  # Its message lists every TFDS dataset.
    known = re.findall(r'^\t- (\S+)$', str(e), re.MULTILINE)
    close = difflib.get_close_matches(config.dataset.split('/')[0].split(':')[0], known, n=3)
    hint = f'; did you mean {" or ".join(close)}?' if close else ''
    raise errors.ConfigError(
      f'config.dataset={config.dataset!r} is not a TFDS dataset, '
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
  config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, split: str
) -> tuple[str, ...]:
  """The undecodable files of a folder split: refused, or (config.skip_bad_images) left out."""
  if not is_folder(config.dataset):
    return ()
  bad = undecodable_images(builder.data_dir, split)
  if bad and not config.skip_bad_images:
    listed = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
    raise errors.ConfigError(
      f'{len(bad)} file(s) in {os.path.join(builder.data_dir, split)} cannot be '
      f'decoded as images: {listed}; remove them or set '
      f'--config.skip_bad_images=True'
    )
  if bad:
    _warn_skipped(bad)
  return bad


@functools.cache
def _warn_skipped(bad: tuple[str, ...]) -> None:
  for name in bad:
    logging.warning('skipping %s: not a decodable image', name)
  logging.warning('skipping %d undecodable image file(s) in all', len(bad))


def _read(
  config: ml_collections.ConfigDict,
  builder: tfds.core.DatasetBuilder,
  split: str,
  process_index: int,
  process_count: int,
  shuffle_seed: int | None,
) -> tf.data.Dataset:
  """Still-encoded {'image', 'label'} of this process's disjoint shard, in a seeded order.

  TFDS datasets read only their own files (`even_splits`); ImageFolder has no sub-split API,
  so every process lists the folder and keeps every `process_count`-th file (its files are
  read, not decoded, before the shard). `shuffle_seed` shuffles TFDS file order (None: fixed).
  """
  decoders = {'image': tfds.decode.SkipDecoding()}
  if is_folder(config.dataset):
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    bad = _skipped_images(config, builder, split)
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
      raise FileNotFoundError(_missing_message(config, builder)) from e
  return ds.map(functools.partial(_checked_label, num_classes=config.num_classes))


def _checked_label(ex: dict[str, tf.Tensor], num_classes: int) -> dict[str, tf.Tensor]:
  """Image and label, failing naming the label when it is not a class of the model."""
  label = ex['label']
  check = tf.debugging.assert_less(
    label,
    tf.cast(num_classes, label.dtype),
    message=(f'a label is not below config.num_classes={num_classes}'),
    summarize=1,
  )
  with tf.control_dependencies([check]):
    return {'image': ex['image'], 'label': tf.identity(label)}


def _missing_message(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder) -> str:
  data_dir = config.data_dir or '~/tensorflow_datasets'
  manual = config.manual_dir or os.path.join(data_dir, 'downloads', 'manual')
  how = f'`tfds build {config.dataset} --data_dir={data_dir}`'
  if config.dataset == 'imagenet2012':
    how = (
      f'download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar by hand into '
      f'{manual}, then run `tfds build imagenet2012 --data_dir={data_dir} '
      f'--manual_dir={manual}`'
    )
  return f'{config.dataset}: no prepared data in {builder.data_dir}; {how}.'


def _train_preprocess(config: ml_collections.ConfigDict) -> Callable[..., dict[str, tf.Tensor]]:
  """(encoded example, stateless seed) -> augmented uint8 image and int32 label."""
  s = config.image_size
  use_ra = config.randaugment_layers > 0 and config.randaugment_magnitude > 0
  rand_augment = (
    randaugment.RandAugment(config.randaugment_layers, config.randaugment_magnitude)
    if use_ra
    else None
  )

  def preprocess(ex: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    crop_seed, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = _random_crop(ex['image'], crop_seed, tuple(config.crop_area_range))
    image = _resize(image, s, s)
    if config.random_flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if rand_augment is not None:
      image = rand_augment(image, ra_seed)
    return {'image': image, 'label': tf.cast(ex['label'], tf.int32)}

  return tf.function(preprocess)  # Traced once; every epoch's pipeline calls the same graph.


def _random_crop(data: tf.Tensor, seed: tf.Tensor, area_range: tuple[float, float]) -> tf.Tensor:
  """Inception crop (area_range of the area, 3/4-4/3 aspect); JPEGs decode only the crop window."""

  def sample(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed,
      min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=area_range,
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    return begin, size

  def jpeg():
    begin, size = sample(tf.image.extract_jpeg_shape(data))
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    begin, size = sample(tf.shape(image))
    return tf.slice(image, begin, size)

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def eval_image(data: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
  """Encoded image (JPEG, PNG, GIF, BMP; grey, RGB or RGBA) -> uint8 [size, size, 3]: resize the
  short side to size / crop_fraction, then take the central size x size."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / crop_fraction / tf.reduce_min(shape)
  h, w = tf.unstack(tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size))
  image = _resize(image, h, w)
  return tf.image.crop_to_bounding_box(image, (h - size) // 2, (w - size) // 2, size, size)


def _resize(image: tf.Tensor, h: int | tf.Tensor, w: int | tf.Tensor) -> tf.Tensor:
  image = tf.image.resize(image, [h, w], method='bicubic', antialias=True)
  image = tf.ensure_shape(
    image, [h if isinstance(h, int) else None, w if isinstance(w, int) else None, 3]
  )
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _mix(
  config: ml_collections.ConfigDict, batch: dict[str, tf.Tensor], seed: tf.Tensor
) -> dict[str, tf.Tensor]:
  """Mixup or cutmix (a coin flip when both are on) of the batch with its reverse.

  Labels become float32 [B, num_classes] mixtures; the images stay uint8 (rounding costs at
  most half a grey level) so the host->device transfer stays small.
  """
  choice_seed, lam_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], choice_seed) < 0.5
  else:
    use_cutmix = tf.constant(config.cutmix_alpha > 0)
  alpha = tf.where(use_cutmix, float(config.cutmix_alpha), float(config.mixup_alpha))
  g = tf.random.stateless_gamma([2], lam_seed, alpha)
  lam = g[0] / (g[0] + g[1])  # ~ Beta(alpha, alpha).

  images = tf.cast(batch['image'], tf.float32)
  other = tf.reverse(images, axis=[0])
  s = config.image_size
  cut = tf.cast(tf.round(s * tf.sqrt(1.0 - lam)), tf.int32)
  centre = tf.random.stateless_uniform([2], box_seed, 0, s, dtype=tf.int32)
  lo, hi = tf.maximum(centre - cut // 2, 0), tf.minimum(centre + cut - cut // 2, s)
  rows, cols = tf.range(s)[:, None], tf.range(s)[None, :]
  box = (rows >= lo[0]) & (rows < hi[0]) & (cols >= lo[1]) & (cols < hi[1])
  box_lam = 1.0 - tf.reduce_mean(tf.cast(box, tf.float32))  # Clipped boxes shrink the paste.
  cutmix_images = tf.where(box[None, :, :, None], other, images)
  mixup_images = lam * images + (1.0 - lam) * other
  lam = tf.where(use_cutmix, box_lam, lam)
  mixed = tf.where(use_cutmix, cutmix_images, mixup_images)

  labels = tf.one_hot(batch['label'], config.num_classes)
  return {
    'image': tf.cast(tf.clip_by_value(tf.round(mixed), 0, 255), tf.uint8),
    'label': lam * labels + (1.0 - lam) * tf.reverse(labels, axis=[0]),
  }
