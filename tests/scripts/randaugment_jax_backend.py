"""RandAugment inside tf.data in a process whose Keras runs on JAX (KERAS_BACKEND=jax, set by
tests/data/test_input_pipeline.py): the ops must still build TensorFlow graphs. Prints the
shapes."""

import numpy as np

from halonet.data import randaugment
from halonet.data.tensorflow_import import tf

augment = randaugment.RandAugment(2, 10)
images = tf.data.Dataset.from_tensor_slices(np.zeros((4, 16, 16, 3), np.uint8))
images = images.map(lambda x: augment(x, tf.constant([1, 2], tf.int64)))
print([tuple(x.shape) for x in images])
