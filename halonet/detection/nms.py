"""Greedy non-maximum suppression with static shapes: the boxes kept, best first, padded to a
fixed count, so the RPN's proposals and the final detections compile once for any image."""

import jax
import jax.numpy as jnp

from halonet.detection import boxes as boxes_lib


def best_first(scores: jnp.ndarray, count: int) -> jnp.ndarray:
  """The indices of the `count` highest scores, highest first (ties: lower index first). A
  stable sort rather than lax.top_k, which XLA's partitioner gathers whole across the devices
  of a data-parallel batch."""
  return jnp.argsort(-scores, stable=True)[:count]


def nms(
  boxes: jnp.ndarray,
  scores: jnp.ndarray,
  iou_threshold: float,
  max_outputs: int,
  valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(indices [max_outputs] into `boxes` [N, 4], kept [max_outputs] bool): the boxes greedy NMS
  keeps, highest score first (a box is dropped when its IoU with a kept higher-scoring box is
  above `iou_threshold`), as torchvision.ops.nms orders them; entries past the last kept box
  are index 0 and not kept. `valid` [N] leaves boxes out (padding)."""
  n = boxes.shape[0]
  valid = jnp.ones(n, bool) if valid is None else valid
  order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
  sorted_boxes = boxes[order]
  overlaps = boxes_lib.pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold
  later = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]
  suppresses = overlaps & later

  def visit(i, kept):
    keep_i = kept[i] & ~jnp.any(kept & suppresses[:, i])
    return kept.at[i].set(keep_i)

  kept = jax.lax.fori_loop(0, n, visit, valid[order])
  # The kept boxes first, in score order: a stable sort of (not kept).
  rank = jnp.argsort(~kept, stable=True)[:max_outputs]
  count = min(max_outputs, n)
  indices = jnp.zeros(max_outputs, jnp.int32).at[:count].set(order[rank[:count]])
  is_kept = jnp.zeros(max_outputs, bool).at[:count].set(kept[rank[:count]])
  return jnp.where(is_kept, indices, 0), is_kept


def batched_nms(
  boxes: jnp.ndarray,
  scores: jnp.ndarray,
  classes: jnp.ndarray,
  iou_threshold: float,
  max_outputs: int,
  valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """nms within each class: boxes of different classes never suppress each other (each class's
  boxes are moved apart by more than the largest coordinate, as torchvision's batched_nms)."""
  offset = (jnp.max(boxes) + 1.0) * classes.astype(boxes.dtype)
  return nms(boxes + offset[:, None], scores, iou_threshold, max_outputs, valid)
