"""The numbers the robustness and transfer evaluations report, from logits and features in NumPy:
each is a few lines a reader can check against its paper's definition.

- ReaL accuracy (Beyer et al. 2020, "Are we done with ImageNet?"): top-1 is right when it is one
  of the image's ReaL labels; images that ReaL's raters gave no label are left out.
- ImageNet-A and ImageNet-R (Hendrycks et al.): top-1 among the set's 200 classes only.
- mCE (Hendrycks & Dietterich 2019): per corruption, the top-1 error averaged over its five
  severities divided by AlexNet's, then averaged over the 15 corruptions.
- Few-shot linear probes: a ridge-regression classifier in closed form on frozen features with
  targets in {-1, 1}, as big_vision's fewshot_lsr evaluator and scikit-learn's RidgeClassifier.
"""

from collections.abc import Mapping, Sequence

import numpy as np

# AlexNet's top-1 error on each ImageNet-C corruption, averaged over severities 1-5: the
# normaliser of mCE, as published with the benchmark (github.com/hendrycks/robustness).
ALEXNET_CORRUPTION_ERRORS = {
  'gaussian_noise': 0.886428,
  'shot_noise': 0.894468,
  'impulse_noise': 0.922640,
  'defocus_blur': 0.819880,
  'glass_blur': 0.826268,
  'motion_blur': 0.785948,
  'zoom_blur': 0.798360,
  'snow': 0.866816,
  'frost': 0.826572,
  'fog': 0.819324,
  'brightness': 0.564592,
  'contrast': 0.853204,
  'elastic_transform': 0.646056,
  'pixelate': 0.717840,
  'jpeg_compression': 0.606500,
}
SEVERITIES = (1, 2, 3, 4, 5)


def real_top1(logits: np.ndarray, real_labels: Sequence[Sequence[int]]) -> tuple[int, int]:
  """(right, counted) over a batch: `real_labels[i]` is image i's set of ReaL labels."""
  predicted = np.argmax(logits, axis=-1)
  counted = [i for i, labels in enumerate(real_labels) if len(labels)]
  right = sum(int(predicted[i] in set(real_labels[i])) for i in counted)
  return right, len(counted)


def subset_top1(logits: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> int:
  """How many of the batch's top-1 predictions among `classes` (1,000-way indices) hit `labels`
  (1,000-way too)."""
  classes = np.asarray(classes)
  predicted = classes[np.argmax(np.asarray(logits)[:, classes], axis=-1)]
  return int(np.sum(predicted == np.asarray(labels)))


def mean_corruption_error(
  top1_errors: Mapping[str, Mapping[int, float]],
  baseline: Mapping[str, float] = ALEXNET_CORRUPTION_ERRORS,
) -> tuple[float, dict[str, float]]:
  """(mCE, each corruption's CE), errors as fractions; every corruption of `baseline` must be
  there at every severity, or the mean would not be the benchmark's."""
  missing = [f'{c}_{s}' for c in baseline for s in SEVERITIES if s not in top1_errors.get(c, {})]
  if missing:
    raise ValueError(f'mCE needs every corruption at every severity; missing {missing}')
  each = {
    c: float(np.mean([top1_errors[c][s] for s in SEVERITIES]) / baseline[c]) for c in baseline
  }
  return float(np.mean(list(each.values()))), each


def ridge_classifier(
  features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float
) -> tuple[np.ndarray, np.ndarray]:
  """(weights, bias) of the least-squares fit to targets 2 * one_hot - 1 with an L2 penalty `l2`
  on the weights (not the bias), solved in closed form in float64."""
  x = np.asarray(features, np.float64)
  y = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  x, y = x - x_mean, y - y_mean
  if x.shape[0] < x.shape[1]:  # Fewer shots than feature dimensions: the n x n system.
    weights = x.T @ np.linalg.solve(x @ x.T + l2 * np.eye(x.shape[0]), y)
  else:
    weights = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ y)
  return weights, y_mean - x_mean @ weights


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """`shots` examples of every class present, drawn without replacement by `seed`; a class with
  fewer examples than that is an error naming it."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  picked = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      raise ValueError(f'class {c} has {len(members)} examples, fewer than {shots} shots')
    picked.append(rng.choice(members, shots, replace=False))
  return np.sort(np.concatenate(picked))


def few_shot_accuracy(
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  *,
  shots: int,
  seeds: Sequence[int],
  num_classes: int,
  l2: float,
) -> tuple[float, float]:
  """(mean, standard deviation) over `seeds` of the test accuracy of a ridge probe fit to
  `shots` examples per class of `train` ((features, labels) pairs of frozen features)."""
  accuracies = []
  for seed in seeds:
    chosen = few_shot_indices(train[1], shots, seed)
    weights, bias = ridge_classifier(train[0][chosen], train[1][chosen], num_classes, l2)
    predicted = np.argmax(np.asarray(test[0], np.float64) @ weights + bias, axis=-1)
    accuracies.append(float(np.mean(predicted == np.asarray(test[1]))))
  return float(np.mean(accuracies)), float(np.std(accuracies))
