"""torchvision's detection ops on the inputs a test wrote: OUT_DIR/inputs.npz -> outputs.npz.

Run in its own process by tests/detection/test_ops.py (torch cannot share a process with
TensorFlow)."""

import sys

import numpy as np
import torch
from torchvision import ops
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import poolers

out_dir = sys.argv[1]
given = dict(np.load(f'{out_dir}/inputs.npz'))
t = {k: torch.from_numpy(v) for k, v in given.items()}
out = {}
out['iou'] = ops.box_iou(t['iou_a'], t['iou_b']).numpy()
rois = torch.cat([t['roi_images'][:, None].float(), t['roi_boxes']], dim=1)
for scale in (0.25, 0.125):
  aligned = ops.roi_align(
    t['features'].permute(0, 3, 1, 2),
    rois,
    output_size=7,
    spatial_scale=scale,
    sampling_ratio=2,
    aligned=True,
  )
  out[f'roi_align_{scale}'] = aligned.permute(0, 2, 3, 1).numpy()
for threshold in (0.3, 0.5, 0.7):
  out[f'nms_{threshold}'] = ops.nms(t['nms_boxes'], t['nms_scores'], threshold).numpy()
  out[f'batched_nms_{threshold}'] = ops.batched_nms(
    t['nms_boxes'], t['nms_scores'], t['nms_classes'], threshold
  ).numpy()
coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
out['encoded'] = coder.encode_single(t['gt_boxes'], t['references']).numpy()
out['decoded'] = coder.decode_single(t['deltas'], t['references']).numpy()
generator = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 2)
images = ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)])
maps = [torch.zeros(1, 8, 16, 24), torch.zeros(1, 8, 8, 12)]
anchors = generator(images, maps)[0]
out['anchors_p2'], out['anchors_p3'] = (
  anchors[: 16 * 24 * 3].numpy(),
  anchors[16 * 24 * 3 :].numpy(),
)
mapper = poolers.initLevelMapper(2, 5, canonical_scale=224, canonical_level=4, eps=1e-6)
out['levels'] = (mapper([t['level_boxes']]) + 2).numpy()
for high, low, allow in ((0.7, 0.3, True), (0.5, 0.5, False), (0.7, 0.3, False)):
  matcher = det_utils.Matcher(high, low, allow_low_quality_matches=allow)
  out[f'matches_{high}_{low}_{allow}'] = matcher(t['quality']).numpy()
out['smooth_l1'] = torch.nn.functional.smooth_l1_loss(
  t['residuals'], torch.zeros_like(t['residuals']), beta=1 / 9, reduction='none'
).numpy()
np.savez(f'{out_dir}/outputs.npz', **out)

# The pyramid and the proposals, on the inputs and weights the test gave.
from collections import OrderedDict  # noqa: E402

from torchvision.models.detection.rpn import RegionProposalNetwork  # noqa: E402
from torchvision.models.detection.rpn import RPNHead  # noqa: E402
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool  # noqa: E402

stages = [t[f'stage{i}'].permute(0, 3, 1, 2) for i in range(4)]
fpn = FeaturePyramidNetwork([s.shape[1] for s in stages], 8, extra_blocks=LastLevelMaxPool())
with torch.no_grad():
  for i in range(4):
    for kind, block in (('lateral', fpn.inner_blocks[i][0]), ('output', fpn.layer_blocks[i][0])):
      block.weight.copy_(t[f'{kind}{i + 2}_kernel'].permute(3, 2, 0, 1))
      block.bias.copy_(t[f'{kind}{i + 2}_bias'])
  pyramid = fpn(OrderedDict((str(i), s) for i, s in enumerate(stages)))
for name, level in zip(('p2', 'p3', 'p4', 'p5', 'p6'), pyramid.values()):
  out[f'fpn_{name}'] = level.permute(0, 2, 3, 1).numpy()

rpn = RegionProposalNetwork(
  generator,
  RPNHead(8, 3),
  0.7,
  0.3,
  256,
  0.5,
  dict(training=100, testing=100),
  dict(training=50, testing=50),
  0.7,
).eval()
counts = [int(n) for n in given['rpn_counts']]
anchors_all = torch.cat([t['rpn_anchors']])
decoded = torch.stack([rpn.box_coder.decode_single(d, anchors_all) for d in t['rpn_deltas']])
sizes = [tuple(int(v) for v in s) for s in given['rpn_image_sizes']]
boxes, scores = rpn.filter_proposals(decoded, t['rpn_objectness'], sizes, counts)
for i, (b, s) in enumerate(zip(boxes, scores)):
  out[f'proposals_{i}'], out[f'proposal_scores_{i}'] = b.numpy(), s.numpy()
np.savez(f'{out_dir}/outputs.npz', **out)

# The second stage: detections from class logits and deltas, and the box head's losses.
from torchvision.models.detection.roi_heads import RoIHeads  # noqa: E402
from torchvision.models.detection.roi_heads import fastrcnn_loss  # noqa: E402

heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
count = t['det_logits'].shape[0]
boxes, scores, labels = heads.postprocess_detections(
  t['det_logits'], t['det_deltas'].reshape(count, -1), [t['det_proposals']], [(64, 96)]
)
out['det_boxes'], out['det_scores'], out['det_classes'] = (
  boxes[0].numpy(),
  scores[0].numpy(),
  labels[0].numpy(),
)
classification, box = fastrcnn_loss(
  t['det_logits'], t['det_deltas'].reshape(count, -1), [t['det_labels']], [t['det_goal']]
)
out['fastrcnn_loss'] = np.array([classification.item(), box.item()])
np.savez(f'{out_dir}/outputs.npz', **out)
