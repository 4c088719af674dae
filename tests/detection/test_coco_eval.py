"""pycocotools on hand-made detections: the ground truth itself scores AP 100, a box moved by
3 of its 10 pixels the AP worked out by hand, and masks pasted from crops land on their pixels."""

import numpy as np
import pytest

from halonet.data import digit_scenes
from halonet.detection import coco_eval


def _one_square(shift: int) -> tuple[dict, list]:
  """An image with one 10 x 10 object at (20, 20) and a detection of it moved right by
  `shift`."""
  masks = np.zeros((1, 1, 64, 64), bool)
  masks[0, 0, 20:30, 20:30] = True
  truth = coco_eval.ground_truth(
    np.array([[[20.0, 20.0, 30.0, 30.0]]]), np.array([[3]]), masks, np.array([[True]]), 10
  )
  moved = np.roll(masks[0], shift, axis=2)
  box = np.array([[20.0 + shift, 20.0, 30.0 + shift, 30.0]])
  return truth, coco_eval.results(0, box, np.array([0.9]), np.array([3]), moved)


def test_the_ground_truth_scores_100():
  scenes = digit_scenes.batch('test', range(6))
  truth = coco_eval.ground_truth(
    scenes['boxes'], scenes['classes'], scenes['masks'], scenes['valid'], 10
  )
  found = []
  for i in range(6):
    valid = scenes['valid'][i]
    found += coco_eval.results(
      i,
      scenes['boxes'][i][valid],
      np.ones(valid.sum()),
      scenes['classes'][i][valid],
      scenes['masks'][i][valid],
    )
  scores = coco_eval.evaluate(truth, found)
  for kind in ('bbox', 'segm'):
    assert scores[kind]['AP'] == pytest.approx(100.0)
    assert scores[kind]['AP50'] == scores[kind]['AP75'] == pytest.approx(100.0)


def test_a_shifted_box_scores_at_the_thresholds_its_iou_passes():
  # Moved by 3: IoU 70 / 130 = 0.54 passes only the 0.5 threshold of the ten (0.5, ..., 0.95):
  # AP = 1/10; a small object (area 100 < 32²), no medium or large ones (-1).
  truth, found = _one_square(3)
  scores = coco_eval.evaluate(truth, found)
  for kind in ('bbox', 'segm'):
    assert scores[kind]['AP'] == pytest.approx(10.0)
    assert scores[kind]['AP50'] == pytest.approx(100.0) and scores[kind]['AP75'] == 0.0
    assert scores[kind]['APs'] == pytest.approx(10.0) and scores[kind]['APm'] == -100.0
  # Moved by 1: IoU 90 / 110 = 0.82 passes 0.5, 0.55, ..., 0.8: 7 of 10.
  scores = coco_eval.evaluate(*_one_square(1))
  assert scores['bbox']['AP'] == pytest.approx(70.0)
  assert coco_eval.evaluate(truth, []) == {
    kind: dict.fromkeys(coco_eval.NUMBERS, 0.0) for kind in ('bbox', 'segm')
  }


def test_pasted_masks_cover_their_pixels():
  crop = np.zeros((1, 28, 28))
  crop[0, :, :14] = 1.0  # The left half of the box.
  pasted = coco_eval.paste_masks(crop, np.array([[10.0, 20.0, 30.0, 40.0]]), 64, 64)
  expected = np.zeros((64, 64), bool)
  expected[20:40, 10:20] = True
  assert (pasted[0] == expected).all()
  # A box over the edge is cut to the image; an empty box pastes nothing.
  pasted = coco_eval.paste_masks(
    np.ones((2, 28, 28)), np.array([[50.0, 50.0, 80.0, 80.0], [5.0, 5.0, 5.0, 9.0]]), 64, 64
  )
  assert pasted[0].sum() == 14 * 14 and pasted[0][50:, 50:].all() and not pasted[1].any()
