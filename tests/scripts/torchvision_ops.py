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
