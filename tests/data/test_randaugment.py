"""RandAugment's own behaviour: each layer is one op with its drawn parameters, strength is
magnitude / 30, warps move whole pixels, seeds are fold-ins, and it runs in tf.data whatever
Keras' backend. Its place in the pipeline is tests/data/test_input_pipeline.py's."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from halonet.data import randaugment
from tests import load

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_randaugment_rotation_matches_reference_range():
  """M=10 rotates by at most +-30 degrees, as the reference RandAugment, not Keras' +-120."""
  from halonet.data.randaugment import RandAugment

  lower, upper = RandAugment(2, 10).layer.random_rotation.factor
  assert (lower * 360, upper * 360) == pytest.approx((-30.0, 30.0))


@pytest.mark.parametrize('magnitude', [6, 15, 30])
def test_randaugment_strength_is_magnitude_over_30_for_every_op_but_rotation(magnitude):
  """Keras' strength f = M / 30 (the paper's M tops out near 30): shear and translation up to f
  on both axes, the colour ops at strength f over pixel values 0-255; rotation +-30 deg * M / 10."""
  from halonet.data.randaugment import RandAugment

  augment, f = RandAugment(2, magnitude), magnitude / 30
  strengths = {
    'random_shear': ('x_factor', 'y_factor'),
    'random_translation': ('height_factor', 'width_factor'),
    'random_brightness': ('factor',),
    'random_color_degeneration': ('factor',),
    'random_contrast': ('factor',),
    'random_sharpness': ('factor',),
    'solarization': ('addition_factor', 'threshold_factor'),
  }
  for name, fields in strengths.items():
    config = getattr(augment.layer, name).get_config()
    for field in fields:
      assert tuple(config[field]) == pytest.approx((0.0, f)), (name, field)
  for name in ('random_brightness', 'random_contrast', 'random_posterization', 'equalization'):
    assert tuple(getattr(augment.layer, name).get_config()['value_range']) == (0, 255), name
  lower, upper = augment.layer.random_rotation.factor
  assert (lower * 360, upper * 360) == pytest.approx((-3.0 * magnitude, 3.0 * magnitude))


def test_randaugment_seeds_are_fold_ins_of_the_example_seed_counting_from_one():
  from halonet.data.tensorflow_import import tf

  seed = tf.constant([5, 9], tf.int64)
  draws = randaugment._FoldInSeeds(seed)  # pylint: disable=protected-access
  for count in (1, 2, 3):
    want = tf.random.experimental.stateless_fold_in(seed, count)
    np.testing.assert_array_equal(draws.next().numpy(), want.numpy())


def test_randaugment_runs_in_tf_data_when_keras_runs_on_jax():
  env = {**os.environ, 'KERAS_BACKEND': 'jax', 'PYTHONPATH': str(ROOT)}
  script = ROOT / 'tests' / 'scripts' / 'randaugment_jax_backend.py'
  result = subprocess.run(
    [sys.executable, str(script)],
    env=env,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == str([(16, 16, 3)] * 4)


def test_randaugment_warps_move_whole_pixels_and_fill_grey():
  """As the reference RandAugment (tensorflow/tpu autoaugment.py): shear, translation and
  rotation sample the nearest pixel (no blend of neighbours) and fill what they uncover with 128."""
  from halonet.data.tensorflow_import import tf

  augment = randaugment.RandAugment(1, 10)
  image = np.random.default_rng(0).choice([0.0, 255.0], (1, 32, 32, 3)).astype(np.float32)
  for name in ('random_shear', 'random_translation', 'random_rotation'):
    op = getattr(augment.layer, name)
    filled = []
    for i in range(6):
      draws = randaugment._FoldInSeeds(tf.constant([3, i], tf.int64))  # pylint: disable=protected-access
      out = op.transform_images(image, op.get_random_transformation(image, seed=draws)).numpy()
      assert set(np.unique(out)) <= {0.0, 128.0, 255.0}, name
      filled.append(128.0 in out)
    assert any(filled), name


def test_each_randaugment_layer_is_one_op_applied_with_its_drawn_parameters():
  """One layer of RandAugment equals one of the eleven Keras ops applied alone, with the
  parameters it draws when every op draws in turn from the layer's seed (so the draws do not
  depend on which op is chosen), and over many seeds every op is chosen."""
  from halonet.data.tensorflow_import import tf

  augment = randaugment.RandAugment(1, 10)
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (24, 24, 3)), tf.uint8)
  batch = tf.cast(image, tf.float32)[None]
  chosen = set()
  for i in range(60):
    seed = tf.constant([7, i], tf.int64)
    _, param_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    draws = randaugment._FoldInSeeds(param_seed)  # pylint: disable=protected-access
    transformations = [op.get_random_transformation(batch, seed=draws) for op in augment.ops]
    got = augment(image, seed).numpy()
    matches = []
    for k, (op, t) in enumerate(zip(augment.ops, transformations)):
      alone = tf.cast(
        tf.clip_by_value(tf.round(op.transform_images(batch, t)[0]), 0, 255), tf.uint8
      )
      if np.array_equal(alone.numpy(), got):
        matches.append(k)
    assert matches, f'seed {i}: no single op gives the result'
    chosen.update(matches)
  assert chosen == set(range(len(randaugment.OPS)))
