"""The stream: this process's uint8 numpy batches of a split, from config.input.

The train stream is a pure function of (seed, process_index, step): epoch e is shuffled with
seeds derived from (seed, process, e) and every random augmentation draw is keyed on (seed,
process, e, position in the epoch), so `start_step=k` rebuilds the stream from step k by skipping
still-encoded examples. Eval makes one padded, masked pass. Where examples come from is
halonet/data/sources.py, what happens to their pixels halonet/data/preprocessing.py.
"""

from halonet.data.tensorflow_import import tf  # First: tfds imports TensorFlow.
from halonet.rounding import ceil_div

# isort: split

from collections.abc import Callable, Iterator
import functools
import itertools
import os

import ml_collections
import numpy as np

from halonet import errors
from halonet.data import preprocessing
from halonet.data import sources as data_sources

Batch = dict[str, np.ndarray]


def steps_per_epoch(examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the one place this is counted): the remainder of each
  shuffled epoch is dropped."""
  return examples // global_batch_size


def eval_batch_count(total: int, batch_size: int, process_count: int) -> int:
  """Batches every process yields in one eval pass: the largest process share, in batches."""
  per_process = ceil_div(total, process_count)  # Ceiling divisions.
  return ceil_div(per_process, batch_size)


def create_split(
  data: ml_collections.ConfigDict,
  split: str,
  *,
  image_size: int,
  num_classes: int,
  seed: int,
  train: bool,
  batch_size: int,
  split_size: int | None,
  process_index: int,
  process_count: int,
  start_step: int = 0,
) -> Iterator[Batch]:
  """Numpy batches of this process's shard of `split` of config.input (`data`); `batch_size` is
  per process; `seed` is the run's (config.seed).

  `split_size`: the split's example count when the caller has it (a run reads it once), else
  None. Every caller names the shard it reads (`process_index` of `process_count`).

  Yields `image` uint8 [B, s, s, 3] and `label`: int32 [B], or float32 [B, num_classes] mixed
  soft labels when mixup/cutmix is on. Train repeats forever. Eval makes one pass that adds a
  bool `mask` [B] (and, for ImageNet-ReaL, its label sets as bool `real_label` [B, num_classes]);
  every process yields the same number of batches (padding is masked), so each example is
  counted exactly once across processes.
  """
  if train and data.dataset.startswith('imagenet_v2'):
    raise errors.ConfigError(f'{data.dataset} has only a test split; use it for eval only.')
  read = lambda file_seed: data_sources.read(
    data, split, num_classes, process_index, process_count, file_seed
  )
  total = data_sources.num_examples(data, split, num_classes) if split_size is None else split_size
  if not train:
    count = eval_batch_count(total, batch_size, process_count)
    return _eval_batches(data, read(None), image_size, num_classes, batch_size, count)
  steps = steps_per_epoch(total, batch_size * process_count)
  if steps == 0:
    raise errors.ConfigError(
      f'{split} of {data.dataset} has {total} examples, fewer than one batch '
      f'of {batch_size} x {process_count} processes.'
    )
  if data.cache:
    cached = read(None).cache()
    read = lambda file_seed: cached
  make_epoch = functools.partial(
    _epoch,
    data,
    read,
    preprocessing.train_preprocess(data, image_size),
    num_classes,
    seed,
    batch_size,
    steps,
    process_index,
  )
  epoch, skip = divmod(start_step, steps)
  # The first epoch is built here, not lazily, so a broken dataset fails at the call.
  return _train_batches(make_epoch(epoch, skip), make_epoch, epoch + 1)


def eval_pass(
  data: ml_collections.ConfigDict,
  split: str,
  *,
  image_size: int,
  num_classes: int,
  global_batch_size: int,
  split_size: int,
  process_index: int,
  process_count: int,
) -> tuple[Iterator[Batch], int]:
  """This process's batches of one padded, masked pass over `split` (of `split_size` examples,
  `global_batch_size` over all processes), and how many it yields."""
  batch_size = global_batch_size // process_count
  batches = create_split(
    data,
    split,
    image_size=image_size,
    num_classes=num_classes,
    seed=0,  # Eval draws nothing at random.
    train=False,
    batch_size=batch_size,
    split_size=split_size,
    process_index=process_index,
    process_count=process_count,
  )
  return batches, eval_batch_count(split_size, batch_size, process_count)


def _train_batches(
  first: tf.data.Dataset, make_epoch: Callable[[int, int], tf.data.Dataset], next_epoch: int
) -> Iterator[Batch]:
  """One tf.data pipeline per epoch, seeded by the epoch, so resuming needs no replay."""
  yield from first.as_numpy_iterator()
  for epoch in itertools.count(next_epoch):
    yield from make_epoch(epoch, 0).as_numpy_iterator()


def _epoch(
  data: ml_collections.ConfigDict,
  read: Callable[[int | None], tf.data.Dataset],
  augment: Callable[..., dict[str, tf.Tensor]],
  num_classes: int,
  seed: int,
  batch_size: int,
  steps: int,
  process_index: int,
  epoch: int,
  skip_steps: int,
) -> tf.data.Dataset:
  """Batches `skip_steps..steps` of `epoch`; skipped examples are never decoded."""
  file_seed, shuffle_seed, example_seed, mix_seed = (
    np.random.SeedSequence([seed, process_index, epoch]).generate_state(4).tolist()
  )
  ds = read(file_seed).shuffle(data.shuffle_buffer, seed=shuffle_seed)
  ds = ds.take(steps * batch_size).enumerate().skip(skip_steps * batch_size)
  ds = ds.map(
    lambda i, ex: augment(ex, tf.stack([np.int64(example_seed), i])),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(batch_size, drop_remainder=True)
  if data.mixup_alpha > 0 or data.cutmix_alpha > 0:
    ds = ds.enumerate(start=skip_steps).map(
      lambda i, batch: preprocessing.mix(
        data, batch, tf.stack([np.int64(mix_seed), i]), num_classes
      ),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
  return with_options(ds.prefetch(tf.data.AUTOTUNE))


def _eval_batches(
  data: ml_collections.ConfigDict,
  ds: tf.data.Dataset,
  image_size: int,
  num_classes: int,
  batch_size: int,
  num_batches: int,
) -> Iterator[Batch]:
  s = image_size
  label_sets = data_sources.REAL_LABELS in ds.element_spec

  def example(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = {
      'image': preprocessing.eval_image(ex['image'], s, data.crop_fraction),
      'label': tf.cast(ex['label'], tf.int32),
      'mask': True,
    }
    if label_sets:
      labels = tf.one_hot(ex[data_sources.REAL_LABELS], num_classes, dtype=tf.int32)
      out[data_sources.REAL_LABELS] = tf.reduce_max(labels, axis=0, keepdims=False) > 0
    return out

  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
  pad = {'image': tf.zeros([s, s, 3], tf.uint8), 'label': np.int32(0), 'mask': False}
  if label_sets:
    pad[data_sources.REAL_LABELS] = np.zeros([num_classes], bool)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * batch_size).batch(batch_size)
  return iter(with_options(ds.prefetch(tf.data.AUTOTUNE)).as_numpy_iterator())


def with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Deterministic order, and TensorFlow's threads bounded beside JAX's."""
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op and a bounded pool, so TF does not oversubscribe the cores JAX uses.
  options.threading.max_intra_op_parallelism = 1
  options.threading.private_threadpool_size = os.cpu_count() or 1
  return ds.with_options(options)
