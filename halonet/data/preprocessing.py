"""What happens to the pixels: each train example's Inception crop, flip and RandAugment, each eval
image's resize and centre crop, mixup/cutmix of a train batch (host, TensorFlow, uint8), and the
standardisation on device.

Every random draw takes a stateless seed, so an example's augmentation is a function of the seed
the stream hands it (halonet/data/pipeline.py), not of the order things run in.
"""

from halonet.data.tensorflow_import import tf  # First: keras imports TensorFlow.

# isort: split

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from halonet.data import randaugment


def normalize_images(images: jax.Array, data: ml_collections.ConfigDict, dtype: Any) -> jax.Array:
  """uint8 -> `dtype` standardised by config.input's pixel_mean and pixel_std; on device, so only
  uint8 crosses the host link."""
  mean = 255 * jnp.asarray(data.pixel_mean, jnp.float32)
  std = 255 * jnp.asarray(data.pixel_std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def train_preprocess(
  data: ml_collections.ConfigDict, image_size: int
) -> Callable[..., dict[str, tf.Tensor]]:
  """(encoded example, stateless seed) -> augmented uint8 image and int32 label."""
  s = image_size
  use_ra = data.randaugment_layers > 0 and data.randaugment_magnitude > 0
  rand_augment = (
    randaugment.RandAugment(data.randaugment_layers, data.randaugment_magnitude) if use_ra else None
  )

  def preprocess(ex: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    crop_seed, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = _random_crop(ex['image'], crop_seed, tuple(data.crop_area_range))
    image = _resize(image, s, s)
    if data.random_flip:
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


def mix(
  data: ml_collections.ConfigDict,
  batch: dict[str, tf.Tensor],
  seed: tf.Tensor,
  num_classes: int,
) -> dict[str, tf.Tensor]:
  """Mixup or cutmix (a coin flip when both are on) of the batch with its reverse.

  Labels become float32 [B, num_classes] mixtures; the images stay uint8 (rounding costs at
  most half a grey level) so the host->device transfer stays small.
  """
  choice_seed, lam_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if data.mixup_alpha > 0 and data.cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], choice_seed) < 0.5
  else:
    use_cutmix = tf.constant(data.cutmix_alpha > 0)
  alpha = tf.where(use_cutmix, float(data.cutmix_alpha), float(data.mixup_alpha))
  g = tf.random.stateless_gamma([2], lam_seed, alpha)
  lam = g[0] / (g[0] + g[1])  # ~ Beta(alpha, alpha).

  images = tf.cast(batch['image'], tf.float32)
  other = tf.reverse(images, axis=[0])
  s = images.shape[1]
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

  labels = tf.one_hot(batch['label'], num_classes)
  return {
    'image': tf.cast(tf.clip_by_value(tf.round(mixed), 0, 255), tf.uint8),
    'label': lam * labels + (1.0 - lam) * tf.reverse(labels, axis=[0]),
  }
