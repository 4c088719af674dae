"""Box and mask AP with pycocotools, the COCO API detection papers report: ground truth and
detections in COCO's format (boxes as x, y, width, height; masks run-length encoded), scored
by COCOeval into AP, AP50, AP75 and AP for small, medium and large objects."""

import contextlib
import io
from typing import Any

import numpy as np
from pycocotools import coco
from pycocotools import cocoeval
from pycocotools import mask as mask_util

NUMBERS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')  # COCOeval.stats[:6], in this order.


def _encoded(mask: np.ndarray) -> dict[str, Any]:
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle['counts'] = rle['counts'].decode()
  return rle


def _xywh(box: np.ndarray) -> list[float]:
  x1, y1, x2, y2 = (float(v) for v in box)
  return [x1, y1, x2 - x1, y2 - y1]


def ground_truth(
  boxes: np.ndarray,
  classes: np.ndarray,
  masks: np.ndarray,
  valid: np.ndarray,
  num_classes: int,
) -> dict[str, Any]:
  """A COCO annotation file's content for images 0..N-1 ([N, G, 4] boxes, [N, G] classes 1..K,
  [N, G, H, W] masks, [N, G] valid); an object's area is its mask's, as COCO's."""
  height, width = masks.shape[2:]
  annotations = []
  for image, g in zip(*np.nonzero(valid)):
    annotations.append(
      {
        'id': len(annotations) + 1,
        'image_id': int(image),
        'category_id': int(classes[image, g]),
        'bbox': _xywh(boxes[image, g]),
        'area': float(masks[image, g].sum()),
        'iscrowd': 0,
        'segmentation': _encoded(masks[image, g]),
      }
    )
  return {
    'images': [{'id': i, 'height': height, 'width': width} for i in range(len(boxes))],
    'annotations': annotations,
    'categories': [{'id': k} for k in range(1, num_classes + 1)],
  }


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """[D, H, W] bool: each [M, M] mask probability, laid over its box and read bilinearly at the
  centre of every image pixel inside it, above 0.5."""
  out = np.zeros((len(masks), height, width), bool)
  size = masks.shape[1]
  for d, (mask, (x1, y1, x2, y2)) in enumerate(zip(masks, boxes)):
    if x2 <= x1 or y2 <= y1:
      continue
    cols = np.arange(max(int(np.floor(x1)), 0), min(int(np.ceil(x2)), width))
    rows = np.arange(max(int(np.floor(y1)), 0), min(int(np.ceil(y2)), height))
    if not len(rows) or not len(cols):
      continue
    u = np.clip((cols + 0.5 - x1) / (x2 - x1) * size - 0.5, 0, size - 1)
    v = np.clip((rows + 0.5 - y1) / (y2 - y1) * size - 0.5, 0, size - 1)
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    u1, v1 = np.minimum(u0 + 1, size - 1), np.minimum(v0 + 1, size - 1)
    fu, fv = (u - u0)[None, :], (v - v0)[:, None]
    value = (
      mask[v0][:, u0] * (1 - fv) * (1 - fu)
      + mask[v0][:, u1] * (1 - fv) * fu
      + mask[v1][:, u0] * fv * (1 - fu)
      + mask[v1][:, u1] * fv * fu
    )
    out[d, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = (
      value > 0.5 if len(rows) and len(cols) else False
    )
  return out


def results(
  image_id: int,
  boxes: np.ndarray,
  scores: np.ndarray,
  classes: np.ndarray,
  masks: np.ndarray,
) -> list[dict[str, Any]]:
  """One image's detections ([D, 4], [D], [D], pasted masks [D, H, W]) as COCO results."""
  return [
    {
      'image_id': image_id,
      'category_id': int(c),
      'bbox': _xywh(b),
      'score': float(s),
      'segmentation': _encoded(m),
    }
    for b, s, c, m in zip(boxes, scores, classes, masks)
  ]


def evaluate(truth: dict[str, Any], found: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """{'bbox': {AP, AP50, AP75, APs, APm, APl}, 'segm': {...}} in percent (-100 where no object
  of that size exists); pycocotools' own printing kept off the terminal."""
  if not found:
    return {kind: {name: 0.0 for name in NUMBERS} for kind in ('bbox', 'segm')}
  scores = {}
  with contextlib.redirect_stdout(io.StringIO()):
    reference = coco.COCO()
    reference.dataset = truth
    reference.createIndex()
    detections = reference.loadRes(found)
    for kind in ('bbox', 'segm'):
      evaluation = cocoeval.COCOeval(reference, detections, kind)
      evaluation.evaluate()
      evaluation.accumulate()
      evaluation.summarize()
      scores[kind] = {name: 100.0 * float(v) for name, v in zip(NUMBERS, evaluation.stats)}
  return scores
