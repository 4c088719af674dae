"""Mask R-CNN's second stage (He et al. 2017) on the proposals: each box read from its pyramid
level by RoIAlign, a two-layer box head (class and per-class box deltas) and a four-conv mask
head (a 28 x 28 mask per class), their training targets and losses, and the detections of an
image, all with static shapes. Losses and detections follow torchvision's MaskRCNN; RoIAlign is
the half-pixel-aligned one (detectron2's ROIAlignV2)."""

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from halonet.detection import boxes as boxes_lib
from halonet.detection import nms as nms_lib
from halonet.detection import roi_align as roi_align_lib
from halonet.detection import targets

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # Box coding of proposals: deltas scaled up.
ROI_LEVELS = (('p2', 4), ('p3', 8), ('p4', 16), ('p5', 32))  # What RoIAlign reads; P6 is the RPN's.


def multiscale_roi_align(
  pyramid: Mapping[str, jnp.ndarray], boxes: jnp.ndarray, output_size: int
) -> jnp.ndarray:
  """[B, R, output_size, output_size, C]: each image's boxes [B, R, 4] read from its own maps,
  each box from the level fpn_levels gives it. One image at a time (vmap), so a data-parallel
  batch never reads, nor gathers, another device's maps; the image's levels laid end to end in
  one table, so each sample is gathered once, from its own level only."""
  shapes = [pyramid[name].shape[1:3] for name, _ in ROI_LEVELS]
  starts = np.cumsum([0] + [h * w for h, w in shapes])[:-1]
  per_level = {
    'offset': jnp.asarray(starts, jnp.int32),
    'height': jnp.asarray([h for h, _ in shapes], jnp.int32),
    'width': jnp.asarray([w for _, w in shapes], jnp.int32),
    'scale': jnp.asarray([1 / stride for _, stride in ROI_LEVELS], jnp.float32),
  }

  def one_image(maps, boxes):
    table = jnp.concatenate(
      [maps[name].reshape(-1, maps[name].shape[-1]) for name, _ in ROI_LEVELS]
    )
    level = roi_align_lib.fpn_levels(boxes) - 2
    return roi_align_lib.read_table(
      table,
      boxes,
      per_level['offset'][level],
      per_level['height'][level],
      per_level['width'][level],
      per_level['scale'][level].astype(boxes.dtype),
      output_size,
    )

  return jax.vmap(one_image)({name: pyramid[name] for name, _ in ROI_LEVELS}, boxes)


class BoxHead(nn.Module):
  """[R, 7, 7, C] -> class logits [R, K + 1] (0: background) and deltas [R, K + 1, 4]."""

  num_classes: int  # K + 1, background included.
  hidden: int = 1024
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='fc6')(x))
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='fc7')(x))
    logits = nn.Dense(
      self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype, name='cls'
    )(x)
    deltas = nn.Dense(
      4 * self.num_classes,
      kernel_init=nn.initializers.normal(0.001),
      dtype=self.dtype,
      name='bbox',
    )(x)
    return logits.astype(jnp.float32), deltas.reshape(-1, self.num_classes, 4).astype(jnp.float32)


class Upsample2x(nn.Module):
  """nn.ConvTranspose(features, (2, 2), strides=(2, 2)) computed as one matmul: the same
  parameters and the same output. Its windows do not overlap, so each input pixel's four output
  pixels are its channels times one of the kernel's four taps. XLA:CPU runs a transposed
  convolution's gradients through a slow generic loop (the mask loss's backward pass took 4.7 s
  against 0.1 s for the rest of a toy batch); a matmul is fast on every backend."""

  features: int
  kernel_init: Callable[..., jnp.ndarray] = nn.initializers.lecun_normal()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', self.kernel_init, (2, 2, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    rois, height, width, _ = x.shape
    # ConvTranspose's kernel taps run opposite to the output pixels they land on.
    y = jnp.einsum('rhwc,ijcd->rhiwjd', x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype))
    return y.reshape(rois, 2 * height, 2 * width, self.features) + bias.astype(self.dtype)


class MaskHead(nn.Module):
  """[R, 14, 14, C] -> mask logits [R, 28, 28, K + 1]: four 3x3 convs, a 2x2 stride-2 transposed
  conv, a 1x1 conv per class."""

  num_classes: int
  width: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    for i in range(4):
      x = nn.relu(
        nn.Conv(self.width, (3, 3), kernel_init=init, dtype=self.dtype, name=f'fcn{i + 1}')(x)
      )
    x = Upsample2x(self.width, kernel_init=init, dtype=self.dtype, name='deconv')(x)
    x = nn.relu(x)
    return nn.Conv(self.num_classes, (1, 1), kernel_init=init, dtype=self.dtype, name='logits')(
      x
    ).astype(jnp.float32)


def box_targets(
  key: jax.Array,
  proposals: jnp.ndarray,
  proposal_valid: jnp.ndarray,
  gt_boxes: jnp.ndarray,
  gt_classes: jnp.ndarray,
  gt_valid: jnp.ndarray,
  *,
  batch_per_image: int = 512,
  positive_fraction: float = 0.25,
) -> dict[str, jnp.ndarray]:
  """One image's sample of batch_per_image boxes for the second stage: the proposals and the
  ground-truth boxes themselves, matched at IoU >= 0.5 (objects) or below (background), sampled
  as targets.sample draws. Returns 'boxes' [S, 4], 'labels' [S] (1..K, 0 background), 'deltas'
  [S, 4] (to the matched box), 'gt_index' [S], 'sampled' and 'positive' [S] masks; sampled rows
  come first, positives before negatives."""
  candidates = jnp.concatenate([proposals, gt_boxes])
  if candidates.shape[0] < batch_per_image:
    raise ValueError(
      f'{proposals.shape[0]} proposals and {gt_boxes.shape[0]} boxes are fewer than the '
      f'{batch_per_image} rows sampled per image'
    )
  valid = jnp.concatenate([proposal_valid, gt_valid])
  matches = targets.match(boxes_lib.pairwise_iou(gt_boxes, candidates), gt_valid, 0.5, 0.5, False)
  matches = jnp.where(valid, matches, targets.BETWEEN)  # Padding is never sampled.
  positive, negative = targets.sample(key, matches, batch_per_image, positive_fraction)
  # Positives, then negatives, then the rest: a stable order, so rows keep their draw.
  order = jnp.argsort(jnp.where(positive, 0, jnp.where(negative, 1, 2)), stable=True)
  order = order[:batch_per_image]
  gt_index = jnp.maximum(matches, 0)[order]
  chosen = candidates[order]
  positive, sampled = positive[order], (positive | negative)[order]
  deltas = boxes_lib.encode(gt_boxes[gt_index], chosen, BOX_WEIGHTS)
  return {
    'boxes': chosen,
    'labels': jnp.where(positive, gt_classes[gt_index], 0),
    'deltas': jnp.where(positive[:, None], deltas, 0.0),
    'gt_index': gt_index,
    'sampled': sampled,
    'positive': positive,
  }


def box_losses(
  class_logits: jnp.ndarray, deltas: jnp.ndarray, sample: Mapping[str, jnp.ndarray]
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(classification loss sum, box loss sum, rows sampled) over a sample's rows: cross-entropy
  of every sampled row, smooth L1 (beta 1/9) of each positive's deltas for its own class. The
  caller divides both by all images' rows sampled, as torchvision's fastrcnn_loss."""
  labels = sample['labels']
  ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, labels)
  own = jnp.take_along_axis(deltas, labels[:, None, None], axis=1)[:, 0]
  box = targets.smooth_l1(own - sample['deltas'], 1 / 9).sum(axis=-1)
  sampled = sample['sampled']
  return (
    jnp.sum(jnp.where(sampled, ce, 0.0)),
    jnp.sum(jnp.where(sample['positive'], box, 0.0)),
    sampled.sum(),
  )


def mask_targets(
  gt_crops: jnp.ndarray,
  gt_boxes: jnp.ndarray,
  gt_index: jnp.ndarray,
  boxes: jnp.ndarray,
  size: int,
) -> jnp.ndarray:
  """[S, size, size] each box's view of its ground truth's mask, soft at the edges (the targets
  of the pixel-wise loss). A mask is kept as its box's crop, [G, M, M] in 0-1 over `gt_boxes`
  [G, 4] (an image's full-size masks would not fit a TPU's memory): each box is moved into its
  ground truth's crop coordinates and read there by RoIAlign (0 outside the crop)."""
  own = gt_boxes[gt_index]
  crop = gt_crops.shape[1]
  origin = jnp.concatenate([own[:, :2], own[:, :2]], axis=-1)
  scale = crop / jnp.maximum(jnp.concatenate([own[:, 2:] - own[:, :2]] * 2, axis=-1), 1e-6)
  local = (boxes - origin) * scale
  masks = gt_crops[..., None].astype(jnp.float32)
  return roi_align_lib.roi_align(masks, local, gt_index, size, 1.0)[..., 0]


def mask_loss(
  logits: jnp.ndarray, labels: jnp.ndarray, goal: jnp.ndarray, positive: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(sum over positives of their mean pixel binary cross-entropy on their class's mask,
  positives): torchvision's maskrcnn_loss once divided."""
  own = jnp.take_along_axis(logits, labels[:, None, None, None], axis=-1)[..., 0]
  per_box = optax.sigmoid_binary_cross_entropy(own, goal).mean(axis=(1, 2))
  return jnp.sum(jnp.where(positive, per_box, 0.0)), positive.sum()


def detect(
  class_logits: jnp.ndarray,
  deltas: jnp.ndarray,
  proposals: jnp.ndarray,
  proposal_valid: jnp.ndarray,
  image_size: jnp.ndarray,
  *,
  score_threshold: float = 0.05,
  nms_threshold: float = 0.5,
  max_detections: int = 100,
  candidates: int = 1000,
) -> dict[str, jnp.ndarray]:
  """One image's detections: every (proposal, class) pair a box, the `candidates` best above
  score_threshold and wider than 0.01 px, NMS within each class, the max_detections best.
  Returns 'boxes' [D, 4], 'scores' [D], 'classes' [D] (1..K), 'valid' [D], best first."""
  num_classes = class_logits.shape[-1]
  scores = jax.nn.softmax(class_logits, axis=-1)[:, 1:]
  boxes = boxes_lib.decode(deltas[:, 1:], proposals[:, None, :], BOX_WEIGHTS)
  boxes = boxes_lib.clip(boxes, image_size[0], image_size[1]).reshape(-1, 4)
  classes = jnp.broadcast_to(jnp.arange(1, num_classes), scores.shape).reshape(-1)
  scores = jnp.where(proposal_valid[:, None], scores, 0.0).reshape(-1)
  index = nms_lib.best_first(scores, min(candidates, scores.shape[0]))
  top = scores[index]
  boxes, classes = boxes[index], classes[index]
  wide = (boxes[:, 2] - boxes[:, 0] >= 1e-2) & (boxes[:, 3] - boxes[:, 1] >= 1e-2)
  keep, kept = nms_lib.batched_nms(
    boxes, top, classes, nms_threshold, max_detections, wide & (top > score_threshold)
  )
  return {
    'boxes': jnp.where(kept[:, None], boxes[keep], 0.0),
    'scores': jnp.where(kept, top[keep], 0.0),
    'classes': jnp.where(kept, classes[keep], 0),
    'valid': kept,
  }
