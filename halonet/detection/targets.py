"""Training targets of the RPN and the box head: each anchor or proposal matched to a
ground-truth box by IoU, and a fixed-size random sample of positives and negatives, with static
shapes (padded ground truth carries `valid=False`), as torchvision's Matcher and
BalancedPositiveNegativeSampler decide them."""

import jax
import jax.numpy as jnp

BELOW_LOW = -1  # Best IoU below the low threshold: a negative.
BETWEEN = -2  # Best IoU between the thresholds: ignored.


def match(
  quality: jnp.ndarray,
  gt_valid: jnp.ndarray,
  high: float,
  low: float,
  allow_low_quality: bool,
) -> jnp.ndarray:
  """[N] the ground truth each of N predictions is matched to (quality [G, N], IoU), or
  BELOW_LOW / BETWEEN. With `allow_low_quality`, the predictions a ground-truth box overlaps
  most (ties included) are matched to their best box whatever the IoU (the RPN's rule, so that
  every object has an anchor)."""
  quality = jnp.where(gt_valid[:, None], quality, -1.0)
  best = quality.max(axis=0)
  best_gt = quality.argmax(axis=0).astype(jnp.int32)
  matches = jnp.where(best < low, BELOW_LOW, jnp.where(best < high, BETWEEN, best_gt))
  if allow_low_quality:
    best_for_gt = quality.max(axis=1, keepdims=True)
    is_best_of_a_gt = jnp.any((quality == best_for_gt) & gt_valid[:, None], axis=0)
    matches = jnp.where(is_best_of_a_gt, best_gt, matches)
  return matches


def _first_in_random_order(key: jax.Array, candidates: jnp.ndarray, count: jnp.ndarray):
  """`count` of the True entries of `candidates`, drawn uniformly without replacement."""
  priority = jnp.where(candidates, jax.random.uniform(key, candidates.shape), jnp.inf)
  rank = jnp.argsort(jnp.argsort(priority))
  return candidates & (rank < count)


def sample(
  key: jax.Array, matches: jnp.ndarray, size: int, positive_fraction: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(positive, negative) [N] masks of `size` predictions at most: up to
  int(size * positive_fraction) matched ones, negatives (BELOW_LOW) for the rest; fewer when
  there are not enough of either."""
  positive, negative = matches >= 0, matches == BELOW_LOW
  num_positive = jnp.minimum(positive.sum(), int(size * positive_fraction))
  num_negative = jnp.minimum(negative.sum(), size - num_positive)
  positive_key, negative_key = jax.random.split(key)
  return (
    _first_in_random_order(positive_key, positive, num_positive),
    _first_in_random_order(negative_key, negative, num_negative),
  )


def smooth_l1(x: jnp.ndarray, beta: float) -> jnp.ndarray:
  """Huber-like: 0.5 x² / beta below beta, |x| - beta / 2 above (beta = 1/9 in Mask R-CNN's
  box losses)."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)
