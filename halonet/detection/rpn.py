"""The region proposal network (Ren et al. 2015) on the pyramid's levels: a shared 3x3 conv with
objectness and box deltas per anchor, the proposals (the best anchors per level, decoded,
clipped, NMS across levels) and its loss, all with static shapes: a fixed number of proposals
per image, the ones NMS dropped marked not valid. torchvision's RegionProposalNetwork decides
the same boxes."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from halonet.detection import boxes as boxes_lib
from halonet.detection import nms as nms_lib
from halonet.detection import targets

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # Box coding of anchors: no scaling.
HEAD_INIT = nn.initializers.normal(0.01)


class RPNHead(nn.Module):
  """Per level [B, h, w, C] -> objectness [B, h * w * A] and deltas [B, h * w * A, 4], ordered
  as boxes.grid_anchors orders the anchors (row, column, anchor)."""

  num_anchors: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jnp.ndarray]) -> tuple[list[jnp.ndarray], list[jnp.ndarray]]:
    shared = nn.Conv(
      levels[0].shape[-1], (3, 3), kernel_init=HEAD_INIT, dtype=self.dtype, name='conv'
    )
    classify = nn.Conv(
      self.num_anchors, (1, 1), kernel_init=HEAD_INIT, dtype=self.dtype, name='cls'
    )
    regress = nn.Conv(
      4 * self.num_anchors, (1, 1), kernel_init=HEAD_INIT, dtype=self.dtype, name='bbox'
    )
    objectness, deltas = [], []
    for x in levels:
      x = nn.relu(shared(x))
      b = x.shape[0]
      objectness.append(classify(x).reshape(b, -1).astype(jnp.float32))
      deltas.append(regress(x).reshape(b, -1, 4).astype(jnp.float32))
    return objectness, deltas


def proposals(
  objectness: Sequence[jnp.ndarray],
  deltas: Sequence[jnp.ndarray],
  anchors: Sequence[jnp.ndarray],
  image_sizes: jnp.ndarray,
  *,
  pre_nms_top_n: int,
  post_nms_top_n: int,
  nms_threshold: float = 0.7,
  min_size: float = 1e-3,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(boxes [B, post_nms_top_n, 4], scores, valid): per image, the pre_nms_top_n most object-like
  anchors of each level, decoded and clipped to the image (`image_sizes` [B, 2]: height, width),
  boxes narrower than min_size left out, then NMS within each level; best first."""

  def one_image(objectness, deltas, size):
    chosen, levels = [], []
    for level, (scores, moves, cells) in enumerate(zip(objectness, deltas, anchors)):
      index = nms_lib.best_first(scores, min(pre_nms_top_n, scores.shape[0]))
      top = scores[index]
      box = boxes_lib.decode(moves[index], cells[index], RPN_WEIGHTS)
      chosen.append((top, box))
      levels.append(jnp.full(top.shape, level, jnp.int32))
    logits = jnp.concatenate([c[0] for c in chosen])
    box = boxes_lib.clip(jnp.concatenate([c[1] for c in chosen]), size[0], size[1])
    wide = (box[:, 2] - box[:, 0] >= min_size) & (box[:, 3] - box[:, 1] >= min_size)
    scores = jax.nn.sigmoid(logits)
    index, kept = nms_lib.batched_nms(
      box, scores, jnp.concatenate(levels), nms_threshold, post_nms_top_n, wide
    )
    return box[index], jnp.where(kept, scores[index], 0.0), kept

  return jax.vmap(one_image)(list(objectness), list(deltas), image_sizes.astype(jnp.float32))


def loss(
  key: jax.Array,
  objectness: jnp.ndarray,
  deltas: jnp.ndarray,
  anchors: jnp.ndarray,
  gt_boxes: jnp.ndarray,
  gt_valid: jnp.ndarray,
  *,
  batch_per_image: int = 256,
  positive_fraction: float = 0.5,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(objectness loss, box loss) over all levels' anchors ([B, N], [B, N, 4], [N, 4]): anchors
  matched to the ground truth ([B, G, 4], padding not `gt_valid`) at IoU >= 0.7 (or the best
  for a box) are objects, < 0.3 background; a sample of batch_per_image per image is scored by
  binary cross-entropy, its objects' deltas by smooth L1 (beta 1/9); both divided by the number
  sampled, as torchvision's."""

  def one_image(key, objectness, deltas, gt, valid):
    matches = targets.match(boxes_lib.pairwise_iou(gt, anchors), valid, 0.7, 0.3, True)
    positive, negative = targets.sample(key, matches, batch_per_image, positive_fraction)
    goal = boxes_lib.encode(gt[jnp.maximum(matches, 0)], anchors, RPN_WEIGHTS)
    goal = jnp.where(positive[:, None], goal, 0.0)  # Unmatched ones may be padding's log(0).
    sampled = positive | negative
    bce = optax.sigmoid_binary_cross_entropy(objectness, positive.astype(jnp.float32))
    box = targets.smooth_l1(deltas - goal, 1 / 9).sum(axis=-1)
    return (
      jnp.sum(jnp.where(sampled, bce, 0.0)),
      jnp.sum(jnp.where(positive, box, 0.0)),
      sampled.sum(),
    )

  keys = jax.random.split(key, objectness.shape[0])
  bce, box, count = jax.vmap(one_image)(keys, objectness, deltas, gt_boxes, gt_valid)
  count = jnp.maximum(count.sum(), 1)
  return bce.sum() / count, box.sum() / count
