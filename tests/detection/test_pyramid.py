"""The feature pyramid and the region proposals against torchvision's (the same weights and
inputs, run in its own process), and the RPN's loss on a case worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from halonet.detection import fpn as fpn_lib
from halonet.detection import rpn as rpn_lib


def test_the_pyramid_is_torchvisions(torchvision_outputs):
  given, expected = torchvision_outputs
  params = {
    f'{kind}{level}': {
      'kernel': given[f'{kind}{level}_kernel'],
      'bias': given[f'{kind}{level}_bias'],
    }
    for kind in ('lateral', 'output')
    for level in (2, 3, 4, 5)
  }
  stages = [jnp.asarray(given[f'stage{i}']) for i in range(4)]
  pyramid = fpn_lib.FPN(width=8).apply({'params': params}, stages)
  assert list(pyramid) == list(fpn_lib.LEVELS)
  for name, level in pyramid.items():
    np.testing.assert_allclose(level, expected[f'fpn_{name}'], rtol=1e-4, atol=1e-4)
  assert [pyramid[n].shape[1:3] for n in fpn_lib.LEVELS] == [
    (16, 24),
    (8, 12),
    (4, 6),
    (2, 3),
    (1, 2),
  ]


def test_nearest_upsampling_of_odd_sizes_reads_what_pytorch_reads():
  x = jnp.arange(3 * 5, dtype=jnp.float32).reshape(1, 3, 5, 1)
  up = fpn_lib.upsample_nearest(x, 7, 9)[0, :, :, 0]
  # Row i reads floor(i * 3 / 7), column j floor(j * 5 / 9).
  np.testing.assert_array_equal(up[:, 0], [0, 0, 0, 5, 5, 10, 10])
  np.testing.assert_array_equal(up[0], [0, 0, 1, 1, 2, 2, 3, 3, 4])


def test_proposals_are_torchvisions(torchvision_outputs):
  given, expected = torchvision_outputs
  counts = np.cumsum(given['rpn_counts'])[:-1]
  split = lambda a, axis: [jnp.asarray(p) for p in np.split(a, counts, axis=axis)]
  boxes, scores, valid = jax.jit(
    lambda o, d, a, s: rpn_lib.proposals(o, d, a, s, pre_nms_top_n=100, post_nms_top_n=50)
  )(
    split(given['rpn_objectness'], 1),
    split(given['rpn_deltas'], 1),
    split(given['rpn_anchors'], 0),
    jnp.asarray(given['rpn_image_sizes']),
  )
  assert boxes.shape == (2, 50, 4)
  for i in range(2):
    kept = np.asarray(valid[i])
    assert kept.sum() == len(expected[f'proposals_{i}']) and kept[: kept.sum()].all()
    np.testing.assert_allclose(boxes[i][kept], expected[f'proposals_{i}'], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores[i][kept], expected[f'proposal_scores_{i}'], rtol=1e-5)
    height, width = given['rpn_image_sizes'][i]
    assert (boxes[i][:, 2] <= width).all() and (boxes[i][:, 3] <= height).all()


def test_rpn_loss_worked_by_hand():
  anchors = jnp.array(
    [
      [0.0, 0.0, 10.0, 10.0],  # IoU 1 with the object: positive, no move needed.
      [1.0, 0.0, 11.0, 10.0],  # IoU 90 / 110: positive, dx = (5 - 6) / 10.
      [0.0, 0.0, 10.0, 20.0],  # IoU 0.5: ignored.
      [20.0, 20.0, 30.0, 30.0],  # IoU 0: background.
    ]
  )
  gt = jnp.array([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])  # The second is padding.
  valid = jnp.array([[True, False]])
  objectness, deltas = jnp.zeros((1, 4)), jnp.zeros((1, 4, 4))
  bce, box = rpn_lib.loss(jax.random.key(0), objectness, deltas, anchors, gt, valid)
  # Three sampled anchors at logit 0: log 2 each; one smooth L1 of 0.1 < 1/9: 0.5 * 0.01 * 9.
  np.testing.assert_allclose(bce, np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(box, 0.045 / 3, rtol=1e-5)
  grads = jax.grad(lambda d: rpn_lib.loss(jax.random.key(0), objectness, d, anchors, gt, valid)[1])(
    deltas
  )
  assert np.isfinite(grads).all()  # The padding's log(0) never reaches a gradient.
