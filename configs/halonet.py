"""Every HaloNet config, by name: `--config=configs/halonet.py:NAME`.

  h0 ... h7    the paper's variants on ImageNet (its rows are in halonet/models/paper.py)
  tiny         a few-thousand-parameter model on 32 px digits, for unit tests
  quickstart   a small all-attention model on the offline digits, 2 CPU cores
  digits_pretrain, digits_finetune   fine-tuning at a new size and on new classes, 2 CPU cores
  sasa_resnet26, sasa_resnet38, sasa_resnet50   SASA's full-attention ResNets (its Table 1)
  sasa_resnet26_conv_stem ...                   the same with the conv stem
  resnet26, resnet38, resnet50                  their conv baselines

Each is `base_config()` plus a few overrides written as data. configs/h0.py ... h7.py, tiny.py
and quickstart.py name the same configs. Every field can be overridden on the command line, e.g.
`--config.model.block_size=12`; the config is locked, so a typo fails naming the field.
"""

import ml_collections

from halonet.defaults import base_config
from halonet.models import paper


def paper_overrides(row: paper.Variant) -> dict:
  """A paper row as config overrides."""
  return {
    'image_size': row.image_size,
    'model.block_size': row.block_size,
    'model.halo_size': row.halo_size,
    'model.value_ratio': row.value_ratio,
    'model.bottleneck_ratio': row.bottleneck_ratio,
    'model.stage_depths': (3, 3, row.stage3_depth, 3),
    'model.final_width': row.final_width,
    # From 448 px a train step needs 2.4-5.4 GB per image without remat (bench/run.py,
    # costs): recompute each block in the backward pass so a realistic batch fits.
    'model.remat': row.image_size >= 448,
  }


# The offline digits at 32 px, one block per stage: what the CPU-sized configs share.
# Digits fill their 8x8 frame and are not mirror-symmetric: mild crops, no flips, no eval crop.
DIGITS = {
  'image_size': 32,
  'num_classes': 10,
  'input.dataset': 'digits',
  'input.eval_splits': ('test',),
  'input.crop_area_range': (0.4, 1.0),
  'input.random_flip': False,
  'input.crop_fraction': 1.0,
  'input.randaugment_layers': 0,
  'input.randaugment_magnitude': 0,
  'model.stage_depths': (1, 1, 1, 1),
  'model.dtype': 'float32',  # CPU-sized: float32 wherever it runs.
}

CPU_CONFIGS = {
  'tiny': {
    **DIGITS,
    'model.block_size': 4,
    'model.halo_size': 1,
    'model.widths': (8, 16, 16, 32),
    'model.num_heads': (2, 2, 2, 2),
    'batch_size': 16,
    'eval_batch_size': 16,
    'num_train_steps': 4,
    'input.shuffle_buffer': 256,
    'optimizer.warmup_epochs': 0.0,
    'log_every_steps': 1,
    'eval_every_steps': 4,
    'checkpoint_every_steps': 2,
  },
  'quickstart': {
    **DIGITS,
    'model.block_size': 4,
    'model.halo_size': 2,
    'model.widths': (32, 64, 96, 128),
    'model.num_heads': (4, 4, 4, 4),
    'batch_size': 64,
    'eval_batch_size': 200,
    # 96.4-98.1% test top-1 over seeds 0-4 (60 epochs: 96.9-98.1%, in 1.5 times the steps).
    'num_epochs': 40.0,
    'input.shuffle_buffer': 2048,
    'label_smoothing': 0.0,
    # 4e-3 per 256 images: 1e-3 at batch 64.
    'optimizer.name': 'adamw',
    'optimizer.learning_rate': 4e-3,
    'optimizer.weight_decay': 0.05,
    'optimizer.warmup_epochs': 1.0,
    'log_every_steps': 20,
    'eval_every_steps': 500,
    'checkpoint_every_steps': 500,
  },
}
# Fine-tuning on 2 CPU cores (halonet/train/finetune.py): pre-train on the digits 0-5 at 32 px, then
# fine-tune on the digits 6-9 at 48 px with --config.init_from=<the first run's workdir> (the
# classifier is re-initialised: 4 classes, not 6). Without init_from: the same run from scratch.
CPU_CONFIGS['digits_pretrain'] = {
  **CPU_CONFIGS['quickstart'],
  'input.dataset': 'digits/0-5',
  'num_classes': 6,
  'num_epochs': 40.0,
}
CPU_CONFIGS['digits_finetune'] = {
  **CPU_CONFIGS['quickstart'],
  'input.dataset': 'digits/6-9',
  'num_classes': 4,
  'image_size': 48,
  'num_epochs': 15.0,
  'optimizer.learning_rate': 1e-3 * 256 / 64,
}

# SASA (Ramachandran et al. 2019): ResNets whose 3x3 convs are k = 7 window attention with 8
# heads, with SASA's attention stem or the ResNet conv stem, at 224 px. The attention runs
# block-wise (b = 8: HaloNet's efficient form of the same function; block_size=1 is SASA's
# literal per-pixel form). Trained with the ResNet recipe: 90 epochs, no RandAugment.
SASA_DEPTHS = {'resnet26': (1, 2, 4, 1), 'resnet38': (2, 3, 5, 2), 'resnet50': (3, 4, 6, 3)}
RESNET = {
  'image_size': 224,
  'num_epochs': 90.0,
  'input.randaugment_layers': 0,
  'optimizer.weight_decay': 1e-4,
  'model.widths': (64, 128, 256, 512),
  'model.bottleneck_ratio': 4.0,
  'model.num_heads': (8, 8, 8, 8),
}
RESNET_CONFIGS = {}
for _name, _depths in SASA_DEPTHS.items():
  _resnet = {**RESNET, 'model.stage_depths': _depths}
  RESNET_CONFIGS[_name] = {**_resnet, 'model.mixers': ('conv',) * 4}
  _sasa = {**_resnet, 'model.mixers': ('sasa',) * 4, 'model.sasa_window': 7, 'model.block_size': 8}
  RESNET_CONFIGS[f'sasa_{_name}'] = {**_sasa, 'model.stem': 'sasa'}
  RESNET_CONFIGS[f'sasa_{_name}_conv_stem'] = _sasa

NAMES = (*paper.VARIANTS, *CPU_CONFIGS, *RESNET_CONFIGS)


def get_config(name: str = 'h1') -> ml_collections.ConfigDict:
  """The config called `name` (see the module docstring)."""
  if name in paper.VARIANTS:
    overrides = paper_overrides(paper.VARIANTS[name])
  elif name in CPU_CONFIGS:
    overrides = CPU_CONFIGS[name]
  elif name in RESNET_CONFIGS:
    overrides = RESNET_CONFIGS[name]
  else:
    raise ValueError(f'unknown HaloNet config {name!r}; expected one of {list(NAMES)}')
  config = base_config()
  config.variant = name
  config.update_from_flattened_dict(overrides)
  return config
