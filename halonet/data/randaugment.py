"""RandAugment from `keras.layers.RandAugment`, driven by per-example stateless seeds.

Why keras: it is maintained, already a dependency, and its ops run inside tf.data with the
TensorFlow backend whatever KERAS_BACKEND the process uses. Why a wrapper: the layer draws its
randomness from a stateful `SeedGenerator` (shared across tf.data's parallel map calls, so the
order is racy and a resumed run differs) and picks one op sequence per *batch*. Here each image
gets its own op choice, and every random draw is a fold-in of one seed we derive from
(seed, epoch, example index), so a resumed run augments exactly as an unbroken one would.
Only the public parts of Keras are used: the layer's per-op sub-layers (`OPS`), each with its
own `get_random_transformation` and `transform_images`; only the chosen op runs.
"""

from halonet.data.tensorflow_import import tf  # First: keras and tfds import TensorFlow.

# isort: split

import keras

# RandAugment's magnitude scale: the paper tunes M up to ~30 on ImageNet (e.g. 28 for
# EfficientNet-B7); keras takes a strength `factor` in [0, 1].
MAX_MAGNITUDE = 30.0
# The ops RandAugment draws from: the sub-layers keras.layers.RandAugment builds with one shared
# strength (shear and translation each cover x and y).
OPS = (
  'random_shear',
  'random_translation',
  'random_rotation',
  'random_brightness',
  'random_color_degeneration',
  'random_contrast',
  'random_sharpness',
  'random_posterization',
  'solarization',
  'auto_contrast',
  'equalization',
)


class _FoldInSeeds(keras.random.SeedGenerator):
  """A `SeedGenerator` whose draws are `fold_in(seed, 1), fold_in(seed, 2), ...`.

  Keras layers accept a `SeedGenerator` as `seed` and call `next()` once per random draw; the
  counter advances at trace time, so the draws are fixed by the graph, not by run-time state.
  `super().__init__` is skipped on purpose: it would create the state variable we avoid.
  """

  def __init__(self, seed: tf.Tensor):  # pylint: disable=super-init-not-called
    self._seed = seed
    self._count = 0

  def next(self, ordered: bool = True) -> tf.Tensor:
    del ordered  # Every draw is already distinct.
    self._count += 1
    return tf.random.experimental.stateless_fold_in(self._seed, self._count)


class RandAugment:
  """Applies N random ops of magnitude M to one uint8 image, reproducibly from a seed."""

  def __init__(self, num_layers: int, magnitude: float):
    self.num_layers = num_layers
    self.layer = keras.layers.RandAugment(
      value_range=(0, 255),
      num_ops=num_layers,
      factor=min(magnitude / MAX_MAGNITUDE, 1.0),
    )
    # Keras gives every op the same `factor`. With M/30 that matches the reference RandAugment
    # (tensorflow/tpu autoaugment.py: at M=10, shear 0.3, translate ~0.3) for shear and translation,
    # but RandomRotation reads its factor as a fraction of a full turn (M=10 would mean +-120 deg):
    # rescale it to the reference's +-30 deg at M=10. The warps sample as the reference does:
    # nearest pixel, grey (128) where the image moved away (Keras: bilinear and mirrored, 2.5x
    # the time on CPU).
    rotation = self.layer.random_rotation.get_config()
    rotation['factor'] = min(magnitude / 10.0, 3.0) * 30.0 / 360.0  # Symmetric, +-30 deg at M=10.
    for name, config in (
      ('random_shear', self.layer.random_shear.get_config()),
      ('random_translation', self.layer.random_translation.get_config()),
      ('random_rotation', rotation),
    ):
      config.update(interpolation='nearest', fill_mode='constant', fill_value=128.0)
      setattr(self.layer, name, type(getattr(self.layer, name)).from_config(config))
    self.ops = [getattr(self.layer, name) for name in OPS]
    # Inside tf.data the ops must be TensorFlow ops even when Keras itself runs on JAX.
    for op in self.ops:
      op.backend.set_backend('tensorflow')

  def __call__(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """`image`: uint8 [H, W, 3]; `seed`: int [2] stateless seed. Returns uint8 [H, W, 3]."""
    batch = tf.cast(image, tf.float32)[None]  # Keras samples one set of parameters per row.
    op_seed, param_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    chosen = tf.random.stateless_uniform([self.num_layers], op_seed, 0, len(OPS), dtype=tf.int32)
    seeds = _FoldInSeeds(param_seed)
    for i in range(self.num_layers):
      # Every op's parameters are drawn (a fixed number of draws per layer, so the seeds do not
      # depend on the choice); only the chosen op runs.
      transformations = [op.get_random_transformation(batch, seed=seeds) for op in self.ops]
      branches = [
        lambda op=op, t=t, batch=batch: op.transform_images(batch, t)
        for op, t in zip(self.ops, transformations)
      ]
      batch = tf.switch_case(chosen[i], branches)
    return tf.cast(tf.clip_by_value(tf.round(batch[0]), 0, 255), tf.uint8)
