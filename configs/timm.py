"""timm's halo networks (halonet/models/timm/byob.py) as runs, at timm's input size and
preprocessing:

  python train.py --config=configs/timm.py:halonet50ts --workdir=W       ImageNet from scratch
  python train.py --config=configs/timm.py:haloregnetz_b,digits --workdir=W \\
      --config.init_from=CONVERTED                                        fine-tune, 2 CPU cores

CONVERTED is a run that `python convert.py` wrote from timm's weights. ',digits'
fine-tunes on the offline digits 6-9 (4 classes: the classifier is re-initialised) for a few
dozen steps at the model's own input size: the README's measured example.
"""

import ml_collections

from halonet.tools import convert

DIGITS_FINETUNE = {
  'input.dataset': 'digits/6-9',
  'num_classes': 4,
  'input.eval_splits': ('test',),
  # Digits fill their frame and are not mirror-symmetric: mild crops, no flips, no eval crop.
  'input.crop_area_range': (0.4, 1.0),
  'input.random_flip': False,
  'input.crop_fraction': 1.0,
  'input.randaugment_layers': 0,
  'label_smoothing': 0.0,
  'model.dtype': 'float32',
  'batch_size': 16,
  'eval_batch_size': 48,
  'num_train_steps': 40,
  'input.shuffle_buffer': 1024,
  'optimizer.name': 'adamw',
  'optimizer.learning_rate': 8e-3,  # Per 256 images: 5e-4 at batch 16.
  'optimizer.weight_decay': 0.05,
  'optimizer.warmup_epochs': 0.0,
  'log_every_steps': 10,
  'eval_every_steps': 40,
  'checkpoint_every_steps': 40,
}


def get_config(arg: str = 'halonet50ts') -> ml_collections.ConfigDict:
  """`NAME` (one of convert.PRETRAINED) or `NAME,digits`."""
  name, _, task = arg.partition(',')
  if task not in ('', 'digits'):
    raise ValueError(f'configs/timm.py:{arg}: the task after the comma must be digits')
  config = convert.model_config(name)
  if task:
    config.variant = f'{name}_digits'
    config.update_from_flattened_dict(DIGITS_FINETUNE)
  return config
