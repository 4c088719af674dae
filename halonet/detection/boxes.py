"""Box geometry as Faster/Mask R-CNN use it, boxes as (x1, y1, x2, y2) in pixels: IoU, the
regression targets between boxes and back, clipping, and the anchors of a feature map.

Every function has static shapes and the conventions of torchvision's detection models (widths
without +1, deltas clamped at log(1000/16) when decoded), so detectron2 and torchvision users
read the same numbers.
"""

import math

import jax.numpy as jnp
import numpy as np

# Largest log-scale a decoded width or height may grow by: exp of it is 1000/16.
SCALE_CLAMP = math.log(1000.0 / 16)


def area(boxes: jnp.ndarray) -> jnp.ndarray:
  """[..., 4] -> [...]; a degenerate box (x2 <= x1 or y2 <= y1) has area 0."""
  width = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  height = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return width * height


def pairwise_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """[N, 4], [M, 4] -> [N, M] intersection over union; 0 where the union is empty (two
  degenerate boxes), where torchvision's box_iou gives NaN."""
  top_left = jnp.maximum(a[:, None, :2], b[None, :, :2])
  bottom_right = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  size = jnp.maximum(bottom_right - top_left, 0.0)
  inter = size[..., 0] * size[..., 1]
  union = area(a)[:, None] + area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def _centres_and_sizes(boxes: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
  width = boxes[..., 2] - boxes[..., 0]
  height = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * width, boxes[..., 1] + 0.5 * height, width, height


def encode(
  boxes: jnp.ndarray, references: jnp.ndarray, weights: tuple[float, float, float, float]
) -> jnp.ndarray:
  """The deltas (dx, dy, dw, dh) that move each reference box (an anchor or a proposal, of
  positive size) onto its box: centre offsets in reference widths, log size ratios, each times
  its weight ((1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head)."""
  x, y, w, h = _centres_and_sizes(boxes)
  rx, ry, rw, rh = _centres_and_sizes(references)
  wx, wy, ww, wh = weights
  return jnp.stack(
    [wx * (x - rx) / rw, wy * (y - ry) / rh, ww * jnp.log(w / rw), wh * jnp.log(h / rh)], axis=-1
  )


def decode(
  deltas: jnp.ndarray, references: jnp.ndarray, weights: tuple[float, float, float, float]
) -> jnp.ndarray:
  """encode's inverse; the size deltas are clamped at SCALE_CLAMP, so a wild regression cannot
  overflow."""
  rx, ry, rw, rh = _centres_and_sizes(references)
  wx, wy, ww, wh = weights
  x = deltas[..., 0] / wx * rw + rx
  y = deltas[..., 1] / wy * rh + ry
  w = jnp.exp(jnp.minimum(deltas[..., 2] / ww, SCALE_CLAMP)) * rw
  h = jnp.exp(jnp.minimum(deltas[..., 3] / wh, SCALE_CLAMP)) * rh
  return jnp.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=-1)


def clip(boxes: jnp.ndarray, height: float, width: float) -> jnp.ndarray:
  """Boxes cut to the image [0, width] x [0, height]."""
  x = jnp.clip(boxes[..., 0::2], 0.0, width)
  y = jnp.clip(boxes[..., 1::2], 0.0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def cell_anchors(size: float, aspect_ratios: tuple[float, ...]) -> np.ndarray:
  """[A, 4] anchors centred on 0 of area size², one per height/width ratio, their corners
  rounded to whole pixels (as torchvision's AnchorGenerator)."""
  height_ratios = np.sqrt(np.asarray(aspect_ratios, np.float32))
  heights = height_ratios * np.float32(size)
  widths = (np.float32(1) / height_ratios) * np.float32(size)
  return np.round(np.stack([-widths, -heights, widths, heights], axis=1) / np.float32(2))


def grid_anchors(
  height: int, width: int, stride: int, size: float, aspect_ratios: tuple[float, ...]
) -> np.ndarray:
  """[height * width * A, 4]: cell_anchors shifted to each cell's top-left corner (y * stride,
  x * stride), row by row, the A anchors of a cell together."""
  ys, xs = np.meshgrid(
    np.arange(height, dtype=np.float32) * stride,
    np.arange(width, dtype=np.float32) * stride,
    indexing='ij',
  )
  shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
  return (shifts + cell_anchors(size, aspect_ratios)[None]).reshape(-1, 4)
