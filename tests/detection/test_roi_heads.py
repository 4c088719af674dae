"""The second stage: detections and the box head's losses against torchvision's, the box and
mask targets and the mask loss on cases worked out by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halonet.detection import roi_heads


def test_detections_are_torchvisions(torchvision_outputs):
  given, expected = torchvision_outputs
  got = jax.jit(roi_heads.detect)(
    jnp.asarray(given['det_logits']),
    jnp.asarray(given['det_deltas']),
    jnp.asarray(given['det_proposals']),
    jnp.ones(60, bool),
    jnp.array([64.0, 96.0]),
  )
  count = len(expected['det_scores'])
  assert 0 < count < 100 and int(got['valid'].sum()) == count
  np.testing.assert_allclose(got['scores'][:count], expected['det_scores'], rtol=1e-5)
  np.testing.assert_allclose(got['boxes'][:count], expected['det_boxes'], rtol=1e-5, atol=1e-3)
  np.testing.assert_array_equal(got['classes'][:count], expected['det_classes'])
  assert not got['scores'][count:].any()


def test_box_losses_are_torchvisions(torchvision_outputs):
  given, expected = torchvision_outputs
  labels = jnp.asarray(given['det_labels'], jnp.int32)
  sample = {
    'labels': labels,
    'deltas': jnp.asarray(given['det_goal']),
    'sampled': jnp.ones(60, bool),
    'positive': labels > 0,
  }
  ce, box, count = roi_heads.box_losses(
    jnp.asarray(given['det_logits']), jnp.asarray(given['det_deltas']), sample
  )
  np.testing.assert_allclose([ce / count, box / count], expected['fastrcnn_loss'], rtol=1e-5)


def test_box_targets_sample_positives_first_and_include_the_ground_truth():
  proposals = jnp.array(
    [[0.0, 0, 10, 10], [0, 0, 10, 12], [50, 50, 60, 60], [1, 1, 9, 9], [0, 0, 0, 0]]
  )
  proposal_valid = jnp.array([True, True, True, True, False])
  gt = jnp.array([[0.0, 0, 10, 10], [0, 0, 0, 0]])
  sample = roi_heads.box_targets(
    jax.random.key(0),
    proposals,
    proposal_valid,
    gt,
    jnp.array([3, 0]),
    jnp.array([True, False]),
    batch_per_image=7,
    positive_fraction=0.6,
  )
  # Positives: proposals 0 (IoU 1), 1 (100 / 120), 3 (64 / 100) and the ground truth itself;
  # background: proposal 2; the padding proposal and padding box are never sampled.
  assert sample['positive'].tolist() == [True] * 4 + [False] * 3
  assert sample['sampled'].tolist() == [True] * 5 + [False] * 2
  assert sample['labels'][:4].tolist() == [3] * 4 and int(sample['labels'][4]) == 0
  np.testing.assert_array_equal(sample['boxes'][4], [50, 50, 60, 60])
  # The ground truth's own row needs no move; proposal 3 grows by 10 / 8 at weight 5.
  rows = {tuple(np.asarray(b).tolist()): d for b, d in zip(sample['boxes'][:4], sample['deltas'])}
  np.testing.assert_allclose(rows[(0.0, 0.0, 10.0, 10.0)], 0.0, atol=1e-6)
  np.testing.assert_allclose(
    rows[(1.0, 1.0, 9.0, 9.0)], [0, 0, 5 * np.log(1.25)] * 1 + [5 * np.log(1.25)], rtol=1e-5
  )


def test_too_few_candidates_for_the_sample_are_refused():
  with pytest.raises(ValueError, match='3 proposals and 1 boxes are fewer than the 8 rows'):
    roi_heads.box_targets(
      jax.random.key(0),
      jnp.zeros((3, 4)),
      jnp.ones(3, bool),
      jnp.zeros((1, 4)),
      jnp.ones(1, jnp.int32),
      jnp.ones(1, bool),
      batch_per_image=8,
    )


def test_mask_targets_and_loss_by_hand():
  # An object whose box is (4, 4)-(12, 12) and whose mask is its box's left half, as a 16 x 16
  # crop of the box.
  crop = jnp.zeros((1, 16, 16)).at[0, :, :8].set(1.0)
  gt = jnp.array([[4.0, 4.0, 12.0, 12.0]])
  inside = jnp.array([[4.0, 5.0, 7.0, 11.0]])  # Wholly in the left half.
  whole = jnp.array([[4.0, 4.0, 12.0, 12.0]])  # The box itself: left half 1, right half 0.
  beyond = jnp.array([[14.0, 4.0, 18.0, 12.0]])  # Outside the box: nothing.
  goal = roi_heads.mask_targets(
    crop, gt, jnp.zeros(3, jnp.int32), jnp.concatenate([inside, whole, beyond]), 4
  )
  np.testing.assert_allclose(goal[0], 1.0)
  np.testing.assert_allclose(goal[1][:, :2], 1.0)
  np.testing.assert_allclose(goal[1][:, 2:], 0.0)
  np.testing.assert_allclose(goal[2], 0.0)
  goal = goal[:2]
  # Logits 0 everywhere: log 2 per pixel; the negative row is left out.
  logits = jnp.zeros((2, 4, 4, 3))
  total, count = roi_heads.mask_loss(logits, jnp.array([2, 1]), goal, jnp.array([True, False]))
  np.testing.assert_allclose(total / count, np.log(2.0), rtol=1e-6)
  # A confident right mask of class 2 costs almost nothing; class 1's channel is not read.
  logits = logits.at[0, ..., 2].set(20.0).at[0, ..., 1].set(-20.0)
  total, _ = roi_heads.mask_loss(logits, jnp.array([2, 1]), goal, jnp.array([True, False]))
  assert float(total) < 1e-6


def test_the_mask_heads_upsampling_is_flaxs_transposed_convolution():
  """Same parameters, same output and same gradients as nn.ConvTranspose(2x2, stride 2)."""
  x = jax.random.normal(jax.random.key(0), (3, 7, 5, 8))
  reference = nn.ConvTranspose(6, (2, 2), (2, 2))
  variables = reference.init(jax.random.key(1), x)
  variables = jax.tree.map(  # A bias that is not zero, so that its place is checked too.
    lambda v: v + jax.random.normal(jax.random.key(2), v.shape), variables
  )
  ours = roi_heads.Upsample2x(6)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
    jnp.shape, variables
  )
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), atol=1e-5)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  for got, want in zip(
    jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(variables, x)),
    jax.tree.leaves(jax.grad(loss(reference), argnums=(0, 1))(variables, x)),
  ):
    np.testing.assert_allclose(got, want, atol=1e-4)
