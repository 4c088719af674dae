"""The detection wing's box geometry, RoIAlign and NMS against torchvision's (run in its own
process) on random boxes with the awkward ones added: boxes over the edge and outside the map,
empty and degenerate boxes, equal boxes, many classes; and small cases worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halonet.detection import boxes as boxes_lib
from halonet.detection import nms as nms_lib
from halonet.detection import roi_align as roi_align_lib

BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def test_iou_matches_torchvision_and_an_empty_union_is_zero(torchvision_outputs):
  given, expected = torchvision_outputs
  got = np.asarray(boxes_lib.pairwise_iou(given['iou_a'], given['iou_b']))
  empty = np.isnan(expected['iou'])
  assert empty.any()  # Two degenerate boxes: torchvision divides 0 by 0.
  np.testing.assert_allclose(got[~empty], expected['iou'][~empty], rtol=1e-5, atol=1e-7)
  assert (got[empty] == 0).all()


def test_iou_of_boxes_worked_by_hand():
  a = jnp.array([[0.0, 0.0, 4.0, 4.0]])
  b = jnp.array([[2.0, 2.0, 6.0, 6.0], [4.0, 0.0, 8.0, 4.0], [0.0, 0.0, 4.0, 4.0], [1, 1, 1, 3]])
  # 4 / (16 + 16 - 4); touching edges; the same box; a line inside.
  np.testing.assert_allclose(boxes_lib.pairwise_iou(a, b), [[4 / 28, 0.0, 1.0, 0.0]])


@pytest.mark.parametrize('scale', [0.25, 0.125])
def test_roi_align_matches_torchvision_aligned(torchvision_outputs, scale):
  given, expected = torchvision_outputs
  got = roi_align_lib.roi_align(
    jnp.asarray(given['features']),
    jnp.asarray(given['roi_boxes']),
    jnp.asarray(given['roi_images'], jnp.int32),
    output_size=7,
    spatial_scale=scale,
    sampling_ratio=2,
  )
  np.testing.assert_allclose(got, expected[f'roi_align_{scale}'], rtol=1e-5, atol=1e-5)
  assert not np.asarray(got[3]).any()  # Outside the map: every sample reads 0.


def test_roi_align_of_a_constant_map_inside_is_the_constant():
  features = jnp.full((1, 8, 8, 2), 3.0)
  out = roi_align_lib.roi_align(
    features, jnp.array([[4.0, 4.0, 20.0, 28.0]]), jnp.zeros(1, jnp.int32), 5, 0.25
  )
  np.testing.assert_allclose(out, 3.0, rtol=1e-6)


@pytest.mark.parametrize('threshold', [0.3, 0.5, 0.7])
def test_nms_keeps_what_torchvision_keeps_in_its_order(torchvision_outputs, threshold):
  given, expected = torchvision_outputs
  boxes, scores = jnp.asarray(given['nms_boxes']), jnp.asarray(given['nms_scores'])
  kept_by_torchvision = expected[f'nms_{threshold}']
  for max_outputs in (len(kept_by_torchvision) + 7, len(kept_by_torchvision) - 3):
    indices, kept = jax.jit(nms_lib.nms, static_argnums=(2, 3))(
      boxes, scores, threshold, max_outputs
    )
    count = int(kept.sum())
    assert count == min(max_outputs, len(kept_by_torchvision))
    assert kept[:count].all() and not kept[count:].any()
    np.testing.assert_array_equal(indices[:count], kept_by_torchvision[:count])
  classes = jnp.asarray(given['nms_classes'], jnp.int32)
  indices, kept = nms_lib.batched_nms(boxes, scores, classes, threshold, len(boxes))
  np.testing.assert_array_equal(indices[kept], expected[f'batched_nms_{threshold}'])


def test_nms_leaves_invalid_boxes_out():
  boxes = jnp.array([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]])
  scores = jnp.array([0.5, 0.9, 0.8, 0.99])
  valid = jnp.array([True, True, True, False])  # The best box is padding.
  indices, kept = nms_lib.nms(boxes, scores, 0.5, 4, valid)
  assert indices[kept].tolist() == [1, 2]  # Box 1 suppresses box 0 (IoU 81 / 119).


def test_box_coding_matches_torchvision_and_inverts(torchvision_outputs):
  given, expected = torchvision_outputs
  references = jnp.asarray(given['references'])
  encoded = boxes_lib.encode(jnp.asarray(given['gt_boxes']), references, BOX_HEAD_WEIGHTS)
  np.testing.assert_allclose(encoded, expected['encoded'], rtol=1e-4, atol=1e-4)
  decoded = boxes_lib.decode(jnp.asarray(given['deltas']), references, BOX_HEAD_WEIGHTS)
  np.testing.assert_allclose(decoded, expected['decoded'], rtol=1e-5, atol=1e-3)
  back = boxes_lib.decode(encoded, references, BOX_HEAD_WEIGHTS)
  np.testing.assert_allclose(back, given['gt_boxes'], rtol=1e-5, atol=1e-3)


def test_box_coding_worked_by_hand():
  reference = jnp.array([[0.0, 0.0, 10.0, 20.0]])  # Centre (5, 10), 10 x 20.
  box = jnp.array([[5.0, 0.0, 25.0, 20.0]])  # Centre (15, 10), 20 x 20.
  np.testing.assert_allclose(
    boxes_lib.encode(box, reference, (1.0, 1.0, 1.0, 1.0)), [[1.0, 0.0, np.log(2.0), 0.0]]
  )


def test_anchors_match_torchvision_and_a_cell_worked_by_hand(torchvision_outputs):
  _, expected = torchvision_outputs
  ratios = (0.5, 1.0, 2.0)
  np.testing.assert_array_equal(
    boxes_lib.grid_anchors(16, 24, 4, 32, ratios), expected['anchors_p2']
  )
  np.testing.assert_array_equal(
    boxes_lib.grid_anchors(8, 12, 8, 64, ratios), expected['anchors_p3']
  )
  # 32² at height/width 1: a 32 x 32 square; at 2: 22.6 wide, 45.3 high, corners rounded.
  np.testing.assert_array_equal(
    boxes_lib.cell_anchors(32, (1.0, 2.0)), [[-16, -16, 16, 16], [-11, -23, 11, 23]]
  )


def test_fpn_levels_match_torchvision(torchvision_outputs):
  given, expected = torchvision_outputs
  got = roi_align_lib.fpn_levels(jnp.asarray(given['level_boxes']))
  np.testing.assert_array_equal(got, expected['levels'])
  assert got.tolist() == [2, 2, 3, 4, 4, 5, 5, 2]


def test_clip_cuts_boxes_to_the_image():
  got = boxes_lib.clip(jnp.array([[-5.0, 3.0, 70.0, 50.0]]), height=40, width=64)
  np.testing.assert_array_equal(got, [[0.0, 3.0, 64.0, 40.0]])
