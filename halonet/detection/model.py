"""Mask R-CNN (He et al. 2017) over a backbone's four stages: the pyramid, the RPN, the box and
mask heads; `losses` for training, `detect` for inference, both with static shapes so one
jax.jit compiles each for any batch of images padded to one size.

The backbone runs outside this module (its stages are the input), so its parameters and
BatchNorm statistics stay a classification run's own: they are loaded from one, and its
BatchNorm is frozen (train=False) as Mask R-CNN fine-tunes it.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from halonet.detection import boxes as boxes_lib
from halonet.detection import fpn as fpn_lib
from halonet.detection import roi_heads
from halonet.detection import rpn as rpn_lib

STRIDES = (4, 8, 16, 32, 64)  # P2-P6.


def anchors_for(
  image_size: tuple[int, int], sizes: Sequence[float], ratios: Sequence[float]
) -> list[np.ndarray]:
  """Each level's anchors for images padded to `image_size` (a multiple of 64): one size per
  level (P2: the smallest), every ratio at every cell."""
  height, width = image_size
  return [
    boxes_lib.grid_anchors(-(-height // s), -(-width // s), s, size, tuple(ratios))
    for s, size in zip(STRIDES, sizes)
  ]


class MaskRCNN(nn.Module):
  """The detector's heads; `num_classes` objects (K), background not counted."""

  num_classes: int
  fpn_width: int = 256
  anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
  anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  rpn_batch_per_image: int = 256
  rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000)  # (training, inference), per level.
  rpn_post_nms_top_n: tuple[int, int] = (2000, 1000)
  roi_batch_per_image: int = 512
  roi_positive_fraction: float = 0.25
  box_hidden: int = 1024
  mask_width: int = 256
  max_detections: int = 100
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.fpn = fpn_lib.FPN(self.fpn_width, dtype=self.dtype)
    self.rpn_head = rpn_lib.RPNHead(len(self.anchor_ratios), dtype=self.dtype)
    self.box_head = roi_heads.BoxHead(self.num_classes + 1, self.box_hidden, dtype=self.dtype)
    self.mask_head = roi_heads.MaskHead(self.num_classes + 1, self.mask_width, dtype=self.dtype)

  def _first_stage(self, stages, image_sizes, train: bool):
    """(pyramid, objectness, deltas, anchors, proposals, proposal_valid)."""
    pyramid = self.fpn(stages)
    objectness, deltas = self.rpn_head([pyramid[name] for name in fpn_lib.LEVELS])
    padded = (stages[0].shape[1] * STRIDES[0], stages[0].shape[2] * STRIDES[0])
    anchors = [jnp.asarray(a) for a in anchors_for(padded, self.anchor_sizes, self.anchor_ratios)]
    boxes, _, valid = rpn_lib.proposals(
      [jax.lax.stop_gradient(o) for o in objectness],
      [jax.lax.stop_gradient(d) for d in deltas],
      anchors,
      image_sizes,
      pre_nms_top_n=self.rpn_pre_nms_top_n[0 if train else 1],
      post_nms_top_n=self.rpn_post_nms_top_n[0 if train else 1],
    )
    return pyramid, objectness, deltas, anchors, boxes, valid

  def losses(
    self,
    stages: Sequence[jnp.ndarray],
    image_sizes: jnp.ndarray,
    gt: dict[str, jnp.ndarray],
    key: jax.Array,
  ) -> dict[str, jnp.ndarray]:
    """The five losses of a batch: 'rpn_objectness', 'rpn_box', 'classifier', 'box', 'mask'.
    `gt`: 'boxes' [B, G, 4], 'classes' [B, G] (1..K), 'mask_crops' [B, G, M, M] (each mask over
    its box), 'valid' [B, G] (False: padding)."""
    pyramid, objectness, deltas, anchors, proposals, valid = self._first_stage(
      stages, image_sizes, train=True
    )
    rpn_key, roi_key = jax.random.split(key)
    rpn_objectness, rpn_box = rpn_lib.loss(
      rpn_key,
      jnp.concatenate(objectness, axis=1),
      jnp.concatenate(deltas, axis=1),
      jnp.concatenate(anchors),
      gt['boxes'],
      gt['valid'],
      batch_per_image=self.rpn_batch_per_image,
    )
    batch = proposals.shape[0]
    samples = jax.vmap(
      lambda k, p, v, b, c, g: roi_heads.box_targets(
        k,
        p,
        v,
        b,
        c,
        g,
        batch_per_image=self.roi_batch_per_image,
        positive_fraction=self.roi_positive_fraction,
      )
    )(
      jax.random.split(roi_key, batch),
      proposals,
      valid,
      gt['boxes'],
      gt['classes'],
      gt['valid'],
    )
    per_image = self.roi_batch_per_image
    flat = {k: v.reshape(batch * per_image, *v.shape[2:]) for k, v in samples.items()}
    features = roi_heads.multiscale_roi_align(pyramid, samples['boxes'], 7)
    class_logits, box_deltas = self.box_head(features.reshape(-1, *features.shape[2:]))
    ce, box, count = roi_heads.box_losses(class_logits, box_deltas, flat)
    # Masks for the positives only, which come first in each image's rows.
    most = int(per_image * self.roi_positive_fraction)
    firsts = {k: v[:, :most] for k, v in samples.items()}
    mask_features = roi_heads.multiscale_roi_align(pyramid, firsts['boxes'], 14)
    mask_logits = self.mask_head(mask_features.reshape(-1, *mask_features.shape[2:]))
    goal = jax.vmap(roi_heads.mask_targets, in_axes=(0, 0, 0, 0, None))(
      gt['mask_crops'], gt['boxes'], firsts['gt_index'], firsts['boxes'], mask_logits.shape[1]
    )
    mask_sum, mask_count = roi_heads.mask_loss(
      mask_logits,
      firsts['labels'].reshape(-1),
      goal.reshape(-1, *goal.shape[2:]),
      firsts['positive'].reshape(-1),
    )
    count = jnp.maximum(count, 1)
    return {
      'rpn_objectness': rpn_objectness,
      'rpn_box': rpn_box,
      'classifier': ce / count,
      'box': box / count,
      'mask': mask_sum / jnp.maximum(mask_count, 1),
    }

  def detect(
    self, stages: Sequence[jnp.ndarray], image_sizes: jnp.ndarray
  ) -> dict[str, jnp.ndarray]:
    """Each image's detections, best first: 'boxes' [B, D, 4], 'scores', 'classes' (1..K),
    'valid' [B, D] and 'masks' [B, D, 28, 28] (probabilities over each box)."""
    pyramid, _, _, _, proposals, valid = self._first_stage(stages, image_sizes, train=False)
    batch, count = proposals.shape[:2]
    features = roi_heads.multiscale_roi_align(pyramid, proposals, 7)
    class_logits, box_deltas = self.box_head(features.reshape(-1, *features.shape[2:]))
    found = jax.vmap(
      lambda logits, deltas, p, v, size: roi_heads.detect(
        logits, deltas, p, v, size, max_detections=self.max_detections
      )
    )(
      class_logits.reshape(batch, count, -1),
      box_deltas.reshape(batch, count, *box_deltas.shape[1:]),
      proposals,
      valid,
      image_sizes.astype(jnp.float32),
    )
    mask_features = roi_heads.multiscale_roi_align(pyramid, found['boxes'], 14)
    mask_logits = self.mask_head(mask_features.reshape(-1, *mask_features.shape[2:]))
    own = jnp.take_along_axis(mask_logits, found['classes'].reshape(-1)[:, None, None, None], -1)
    found['masks'] = jax.nn.sigmoid(own[..., 0]).reshape(
      batch, self.max_detections, *own.shape[1:3]
    )
    return found

  def __call__(self, stages: Sequence[jnp.ndarray], image_sizes: jnp.ndarray):
    """Inference (what init traces): every head is used."""
    return self.detect(stages, image_sizes)
