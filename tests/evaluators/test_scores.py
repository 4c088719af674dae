"""halonet/evaluators/scores.py against independent references: hand-made logits and label sets
counted by hand, timm's own ImageNet-A/R index lists, a hand-made error table, scikit-learn's
RidgeClassifier."""

import importlib.util
import os

import numpy as np
import pytest
from sklearn import linear_model

from halonet.data import imagenet_classes
from halonet.evaluators import scores


def _one_hot_logits(predictions, num_classes=1000):
  logits = np.zeros((len(predictions), num_classes), np.float32)
  logits[np.arange(len(predictions)), predictions] = 1.0
  return logits


def test_real_accuracy_counts_labelled_images_only():
  # Top-1 7 with ReaL {7, 9}: right. 3 with {4}: wrong. 5 with {}: not counted. 2 with {2}: right.
  logits = _one_hot_logits([7, 3, 5, 2])
  assert scores.real_top1(logits, [[7, 9], [4], [], [2]]) == (2, 3)


def test_the_200_class_subsets_are_timms_indices():
  """timm ships each set's 1,000-way indices, derived independently of our class table."""
  # Only found, not imported: importing torch where TensorFlow is loaded (other tests in this
  # worker) crashes the process.
  timm = importlib.util.find_spec('timm')
  if timm is None:
    pytest.skip('timm is not installed (requirements-timm.txt)')
  timm_info = os.path.join(timm.submodule_search_locations[0], 'data', '_info')
  for name in ('imagenet_a', 'imagenet_r'):
    with open(os.path.join(timm_info, f'{name}_indices.txt')) as f:
      want = tuple(sorted(int(line) for line in f.read().split()))
    assert imagenet_classes.subset_indices(name) == want
    assert len(want) == 200


def test_subset_top1_takes_the_best_logit_among_the_sets_classes():
  classes = imagenet_classes.subset_indices('imagenet_a')
  outside = next(i for i in range(1000) if i not in classes)
  logits = np.zeros((3, 1000), np.float32)
  logits[0, outside], logits[0, classes[5]] = 9.0, 1.0  # The largest logit is not in the set.
  logits[1, classes[0]] = 1.0
  logits[2, classes[7]] = 1.0
  labels = np.array([classes[5], classes[1], classes[7]])
  assert scores.subset_top1(logits, labels, classes) == 2


def test_mce_normalises_each_corruption_by_alexnet_and_averages():
  alexnet = scores.ALEXNET_CORRUPTION_ERRORS
  # Half AlexNet's error at every severity of every corruption but fog, which equals it.
  table = {c: {s: alexnet[c] / 2 for s in scores.SEVERITIES} for c in alexnet}
  table['fog'] = {1: 0.6, 2: 0.75, 3: 0.8, 4: 0.95, 5: 0.99662}  # Mean 0.819324.
  mce, each = scores.mean_corruption_error(table)
  assert each['fog'] == pytest.approx(1.0)
  assert each['snow'] == pytest.approx(0.5)
  assert mce == pytest.approx((14 * 0.5 + 1.0) / 15)
  assert len(alexnet) == 15


def test_mce_refuses_a_table_without_every_severity():
  table = {c: {s: 0.5 for s in scores.SEVERITIES} for c in scores.ALEXNET_CORRUPTION_ERRORS}
  del table['fog'][3]
  with pytest.raises(ValueError, match='fog_3'):
    scores.mean_corruption_error(table)


@pytest.mark.parametrize('num_examples, dims', [(60, 8), (12, 40)])
def test_the_ridge_probe_is_scikit_learns_ridge_classifier(num_examples, dims):
  rng = np.random.default_rng(0)
  labels = np.arange(num_examples) % 4
  labels[: num_examples // 3] = 0  # Unbalanced: each class's mean target differs.
  features = rng.normal(size=(num_examples, dims)) + labels[:, None] * 0.3
  test = rng.normal(size=(50, dims))
  weights, bias = scores.ridge_classifier(features, labels, 4, l2=2.0)
  reference = linear_model.RidgeClassifier(alpha=2.0, solver='cholesky').fit(features, labels)
  np.testing.assert_allclose(weights, reference.coef_.T, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(bias, reference.intercept_, rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(np.argmax(test @ weights + bias, -1), reference.predict(test))


def test_few_shot_draws_each_class_shots_times_and_names_a_short_class():
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
  chosen = scores.few_shot_indices(labels, 2, seed=3)
  assert sorted(np.bincount(labels[chosen])) == [2, 2, 2]
  assert len(set(chosen)) == 6
  assert len(scores.few_shot_indices(labels, 3, seed=0)) == 9  # Class 0 has exactly 3.
  with pytest.raises(ValueError, match='class 0 has 3 examples, fewer than 4 shots'):
    scores.few_shot_indices(labels, 4, seed=0)


def test_few_shot_accuracy_separates_separable_classes_and_not_noise():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(5, 16)) * 4

  def split(n, informative):
    labels = np.arange(n) % 5
    noise = rng.normal(size=(n, 16))
    return (noise + centres[labels] if informative else noise), labels

  mean, spread = scores.few_shot_accuracy(
    split(100, True), split(200, True), shots=5, seeds=(0, 1, 2), num_classes=5, l2=1.0
  )
  assert mean > 0.95 and spread < 0.05
  chance, _ = scores.few_shot_accuracy(
    split(100, False), split(2000, False), shots=5, seeds=(0, 1, 2), num_classes=5, l2=1.0
  )
  assert abs(chance - 0.2) < 0.05


def test_alexnets_errors_are_the_published_ones_under_their_corruptions_names():
  """github.com/hendrycks/robustness lists them as one array in this order of corruptions."""
  published = [
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816,
    0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500,
  ]  # fmt: skip
  order = (
    'gaussian_noise shot_noise impulse_noise defocus_blur glass_blur motion_blur zoom_blur snow '
    'frost fog brightness contrast elastic_transform pixelate jpeg_compression'
  ).split()
  assert scores.ALEXNET_CORRUPTION_ERRORS == dict(zip(order, published, strict=True))
  # Every model at 50% error: its mCE follows from the table alone.
  table = {c: dict.fromkeys(scores.SEVERITIES, 0.5) for c in order}
  assert scores.mean_corruption_error(table)[0] == pytest.approx(
    sum(0.5 / e for e in published) / 15
  )
