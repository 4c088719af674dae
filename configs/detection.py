"""Mask R-CNN configs, by name: `python train.py --config=configs/detection.py:NAME`.

  digits       a small HaloNet backbone on the offline digit scenes, 2 CPU cores (quick-start)
  r50_se, r50_se_b8, r50_se_b32, r101_se, r101_se_b8
               the paper's detection rows on COCO (its Mask R-CNN table): ResNet-50/101 with SE
               in every block, and with local self-attention of block b in place of the last
               stage's 3x3 convs

The paper's rows give the backbone and b; the rest is the usual COCO recipe, close to
detectron2's 100-epoch large-scale-jitter baseline: 1024 px canvases, scale jitter 0.1-2.0,
SGD 0.1 at batch 64 with weight decay 4e-5 (here Nesterov, cosine in place of its steps), the
backbone's BatchNorm frozen. Which stages the paper's attention replaces and its halo are not in
the seeds: these rows put it in stage 4 with h = 3 (--config.model.conv_stages and
--config.model.halo_size move them). Start the backbone from an ImageNet run with
--config.init_from=WORKDIR (the same model fields); COCO is read from
--config.input.data_dir (halonet/detection/data.py).
"""

import ml_collections

from configs import halonet as halonet_configs
from halonet.defaults import base_config

DETECTION = {
  'task': 'detection',
  'input.randaugment_layers': 0,
  'input.randaugment_magnitude': 0,
  'input.crop_fraction': 1.0,
  'label_smoothing': 0.0,
}

DIGITS = {
  **DETECTION,
  **halonet_configs.DIGITS,
  'image_size': 64,
  'input.dataset': 'digit_scenes',
  'input.eval_splits': ('test',),
  'model.block_size': 4,
  'model.halo_size': 2,
  'model.widths': (32, 64, 96, 128),
  'model.num_heads': (4, 4, 4, 4),
  'detection.fpn_width': 32,
  'detection.anchor_sizes': (8, 16, 32, 64, 128),
  'detection.rpn_batch_per_image': 64,
  'detection.rpn_pre_nms_top_n': (128, 64),
  'detection.rpn_post_nms_top_n': (64, 32),
  'detection.roi_batch_per_image': 32,
  'detection.box_hidden': 64,
  'detection.mask_width': 16,
  'detection.max_detections': 10,
  'detection.max_objects': 4,
  'detection.scale_range': (0.75, 1.25),
  'batch_size': 16,
  'eval_batch_size': 50,
  'num_train_steps': 400,
  'optimizer.name': 'adamw',
  'optimizer.learning_rate': 2e-3 * 256 / 16,  # 2e-3 at batch 16.
  'optimizer.weight_decay': 1e-4,
  'optimizer.warmup_epochs': 0.25,
  'log_every_steps': 20,
  'eval_every_steps': 1000,
  'checkpoint_every_steps': 200,
}

COCO = {
  **DETECTION,
  'image_size': 1024,
  'num_classes': 80,
  'input.dataset': 'coco',
  'input.eval_splits': ('validation',),
  'model.widths': (64, 128, 256, 512),
  'model.bottleneck_ratio': 4.0,
  'model.num_heads': (8, 8, 8, 8),
  'model.use_se': True,
  'batch_size': 64,
  'eval_batch_size': 64,
  'num_epochs': 100.0,
  'optimizer.learning_rate': 0.1 * 256 / 64,
  'optimizer.weight_decay': 4e-5,
  'optimizer.warmup_epochs': 250 / (118_287 / 64),  # 250 steps.
  'log_every_steps': 100,
  'eval_every_steps': 10_000,
  'checkpoint_every_steps': 2_000,
}
DEPTHS = {'r50': (3, 4, 6, 3), 'r101': (3, 4, 23, 3)}
ROWS = {
  'r50_se': ('r50', 0),
  'r50_se_b8': ('r50', 8),
  'r50_se_b32': ('r50', 32),
  'r101_se': ('r101', 0),
  'r101_se_b8': ('r101', 8),
}


def _row(depth: str, block: int) -> dict:
  row = {**COCO, 'model.stage_depths': DEPTHS[depth]}
  if block:
    return {
      **row,
      'model.mixers': ('conv', 'conv', 'conv', 'halo'),
      'model.block_size': block,
      'model.halo_size': 3,
    }
  return {**row, 'model.mixers': ('conv',) * 4}


CONFIGS = {'digits': DIGITS, **{name: _row(*row) for name, row in ROWS.items()}}


def get_config(name: str = 'digits') -> ml_collections.ConfigDict:
  """The config called `name` (see the module docstring)."""
  if name not in CONFIGS:
    raise ValueError(f'unknown detection config {name!r}; expected one of {list(CONFIGS)}')
  config = base_config()
  config.variant = name
  config.update_from_flattened_dict(CONFIGS[name])
  return config
