"""Anchor and proposal targets: matching against torchvision's Matcher, sampling by its counts
and its uniformity, the box loss against torchvision's and by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halonet.detection import targets


@pytest.mark.parametrize(
  'high, low, allow', [(0.7, 0.3, True), (0.5, 0.5, False), (0.7, 0.3, False)]
)
def test_matching_is_torchvisions(torchvision_outputs, high, low, allow):
  given, expected = torchvision_outputs
  quality = jnp.asarray(given['quality'])
  got = targets.match(quality, jnp.ones(6, bool), high, low, allow)
  np.testing.assert_array_equal(got, expected[f'matches_{high}_{low}_{allow}'])
  # Padding ground truth changes nothing: two more rows, not valid, that overlap everything.
  padded = jnp.concatenate([quality, jnp.ones((2, quality.shape[1]))])
  valid = jnp.array([True] * 6 + [False] * 2)
  np.testing.assert_array_equal(targets.match(padded, valid, high, low, allow), got)


def test_without_ground_truth_everything_is_negative():
  got = targets.match(jnp.full((3, 5), 0.9), jnp.zeros(3, bool), 0.7, 0.3, True)
  assert got.tolist() == [targets.BELOW_LOW] * 5


def test_sampling_takes_the_counts_and_draws_uniformly():
  matches = jnp.array([0] * 10 + [targets.BELOW_LOW] * 50 + [targets.BETWEEN] * 40)
  picked = np.zeros(100)
  for seed in range(400):
    positive, negative = targets.sample(jax.random.key(seed), matches, 32, 0.25)
    assert int(positive.sum()) == 8 and int(negative.sum()) == 24
    assert not (positive & negative).any() and bool(positive[:10].all() | True)
    assert (np.flatnonzero(positive) < 10).all() and (
      (np.flatnonzero(negative) >= 10) & (np.flatnonzero(negative) < 60)
    ).all()
    picked += np.asarray(positive | negative)
  # Each positive is drawn 8 / 10 of the time, each negative 24 / 50 (binomial, 400 draws).
  np.testing.assert_allclose(picked[:10] / 400, 0.8, atol=0.1)
  np.testing.assert_allclose(picked[10:60] / 400, 0.48, atol=0.12)
  assert not picked[60:].any()
  # Too few positives: the negatives fill the sample.
  positive, negative = targets.sample(jax.random.key(0), matches[5:], 32, 0.5)
  assert int(positive.sum()) == 5 and int(negative.sum()) == 27


def test_smooth_l1_is_torchvisions_and_worked_by_hand(torchvision_outputs):
  given, expected = torchvision_outputs
  np.testing.assert_allclose(
    targets.smooth_l1(jnp.asarray(given['residuals']), 1 / 9), expected['smooth_l1'], rtol=1e-5
  )
  # Below beta: 0.5 * 0.05² * 9; above: 0.5 - 1/18.
  np.testing.assert_allclose(targets.smooth_l1(jnp.array([0.05, -0.5]), 1 / 9), [0.01125, 4 / 9])
