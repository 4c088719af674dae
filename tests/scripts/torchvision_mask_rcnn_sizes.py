"""The parameter counts of torchvision's Mask R-CNN (ResNet-50 FPN, BatchNorm frozen as a
pretrained backbone has it, 80 classes and the background), part by part: OUT_DIR/sizes.json.

Run in its own process by tests/detection/test_detection_runs.py (torch cannot share a process
with TensorFlow)."""

import json
import sys

from torchvision.models import resnet
from torchvision.models.detection import backbone_utils
from torchvision.models.detection import mask_rcnn
from torchvision.ops import misc

backbone = resnet.resnet50(norm_layer=misc.FrozenBatchNorm2d)
model = mask_rcnn.MaskRCNN(
  backbone_utils._resnet_fpn_extractor(backbone, 5),  # pylint: disable=protected-access
  num_classes=81,
)
parts = {
  'body': model.backbone.body,
  'fpn': model.backbone.fpn,
  'rpn_head': model.rpn.head,
  'box_head': [model.roi_heads.box_head, model.roi_heads.box_predictor],
  'mask_head': [model.roi_heads.mask_head, model.roi_heads.mask_predictor],
}
sizes = {
  name: sum(p.numel() for m in (part if isinstance(part, list) else [part]) for p in m.parameters())
  for name, part in parts.items()
}
with open(f'{sys.argv[1]}/sizes.json', 'w') as f:
  json.dump(sizes, f)
