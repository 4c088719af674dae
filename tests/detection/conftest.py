"""The detection tests' shared reference: torchvision's ops, run once per worker in their own
process (torch cannot share one with TensorFlow), on inputs with the awkward cases added."""

import numpy as np
import pytest

from tests import torch_side


def _random_boxes(rng: np.random.Generator, n: int, extent: float) -> np.ndarray:
  corner = rng.uniform(-0.1 * extent, extent, (n, 2))
  size = rng.uniform(1.0, 0.5 * extent, (n, 2))
  return np.concatenate([corner, corner + size], axis=1).astype(np.float32)


def _quality(rng: np.random.Generator) -> np.ndarray:
  """[6, 300] IoU-like values: most pairs apart (0), a ground truth whose best is low, and ties
  of a ground truth's best."""
  quality = np.where(rng.random((6, 300)) < 0.7, 0.0, rng.random((6, 300))).astype(np.float32)
  quality[2] = np.minimum(quality[2], 0.2)
  quality[4, [10, 20, 30]] = 0.95
  quality[4, [11, 21]] = 0.0
  return quality


STAGE_SHAPES = ((16, 24, 4), (8, 12, 6), (4, 6, 8), (2, 3, 10))  # Strides 4-32 of 64 x 96.
RPN_LEVELS = ((16, 24, 4, 32), (8, 12, 8, 64), (4, 6, 16, 128))  # (h, w, stride, anchor size).
RATIOS = (0.5, 1.0, 2.0)


def _pyramid_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Two images' stage maps, and pyramid weights (8 channels) as Flax holds them."""
  given = {}
  for i, (h, w, c) in enumerate(STAGE_SHAPES):
    given[f'stage{i}'] = rng.normal(size=(2, h, w, c)).astype(np.float32)
    given[f'lateral{i + 2}_kernel'] = rng.normal(0, 0.3, (1, 1, c, 8)).astype(np.float32)
    given[f'output{i + 2}_kernel'] = rng.normal(0, 0.1, (3, 3, 8, 8)).astype(np.float32)
    for kind in ('lateral', 'output'):
      given[f'{kind}{i + 2}_bias'] = rng.normal(0, 0.1, 8).astype(np.float32)
  return given


def _rpn_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Anchors of three levels, random objectness and deltas of two images of unequal sizes."""
  from halonet.detection import boxes as boxes_lib  # pylint: disable=import-outside-toplevel

  anchors = [boxes_lib.grid_anchors(h, w, s, size, RATIOS) for h, w, s, size in RPN_LEVELS]
  total = sum(len(a) for a in anchors)
  return {
    'rpn_anchors': np.concatenate(anchors),
    'rpn_counts': np.array([len(a) for a in anchors]),
    'rpn_objectness': rng.normal(size=(2, total)).astype(np.float32),
    'rpn_deltas': rng.normal(0, 0.3, (2, total, 4)).astype(np.float32),
    'rpn_image_sizes': np.array([[64, 96], [60, 90]]),
  }


def _second_stage_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """60 proposals of a 64 x 96 image, 3 classes and background: logits, deltas, targets."""
  proposals = _random_boxes(rng, 60, 90.0)
  proposals[50:] = proposals[40:50] + 1.0  # Near-duplicates for NMS to drop.
  labels = rng.integers(0, 4, 60)
  return {
    'det_proposals': proposals,
    'det_logits': (3 * rng.normal(size=(60, 4))).astype(np.float32),
    'det_deltas': rng.normal(0, 0.5, (60, 4, 4)).astype(np.float32),
    'det_labels': labels,
    'det_goal': np.where(labels[:, None] > 0, rng.normal(0, 0.5, (60, 4)), 0).astype(np.float32),
  }


def _inputs() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  awkward = np.array(
    [
      [0, 0, 64, 48],  # The whole image.
      [-20, -10, 10, 12],  # Over the top-left edge.
      [60, 40, 90, 70],  # Over the bottom-right edge.
      [150, 120, 170, 140],  # Outside the map at both scales.
      [10, 10, 10, 30],  # Zero width.
      [20, 20, 20, 20],  # A point.
      [30, 30, 25, 35],  # x2 < x1.
      [5.5, 7.25, 6.0, 7.5],  # Smaller than a feature pixel.
    ],
    np.float32,
  )
  roi_boxes = np.concatenate([awkward, _random_boxes(rng, 24, 64.0)])
  nms_boxes = _random_boxes(rng, 120, 50.0)
  nms_boxes[60:70] = nms_boxes[50:60] + rng.uniform(-1, 1, (10, 4)).astype(np.float32)
  references = _random_boxes(rng, 40, 100.0)
  return {
    'iou_a': np.concatenate([awkward, _random_boxes(rng, 20, 64.0)]),
    'iou_b': np.concatenate([_random_boxes(rng, 30, 64.0), awkward[[0, 4, 5]]]),
    'features': rng.normal(size=(2, 12, 16, 5)).astype(np.float32),
    'roi_boxes': roi_boxes,
    'roi_images': rng.integers(0, 2, len(roi_boxes)).astype(np.int64),
    'nms_boxes': nms_boxes,
    'nms_scores': rng.permutation(len(nms_boxes)).astype(np.float32) / len(nms_boxes),
    'nms_classes': rng.integers(0, 4, len(nms_boxes)).astype(np.int64),
    'references': references,
    'gt_boxes': _random_boxes(rng, 40, 100.0),
    'deltas': np.concatenate(
      [rng.normal(size=(39, 4)), [[0.0, 0.0, 100.0, -100.0]]]  # Beyond the clamp.
    ).astype(np.float32),
    'quality': _quality(rng),
    'residuals': rng.normal(scale=0.3, size=200).astype(np.float32),
    **_pyramid_inputs(rng),
    **_rpn_inputs(rng),
    **_second_stage_inputs(rng),
    'level_boxes': np.array(
      [
        [0, 0, 1, 1],
        [0, 0, 111, 111],
        [0, 0, 112, 112],
        [0, 0, 224, 224],
        [0, 0, 447, 449],
        [0, 0, 448, 448],
        [0, 0, 2000, 2000],
        [0, 0, 0, 50],
      ],
      np.float32,
    ),
  }


@pytest.fixture(scope='module')
def torchvision_outputs(tmp_path_factory):
  """(inputs, torchvision's outputs on them)."""
  folder = tmp_path_factory.mktemp('torchvision_ops')
  given = _inputs()
  np.savez(folder / 'inputs.npz', **given)
  torch_side.run_script('torchvision_ops.py', str(folder), timeout=300)
  return given, dict(np.load(folder / 'outputs.npz'))
