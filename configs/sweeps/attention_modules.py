"""The vision-attention survey's modules (SE, ECA, CBAM, BAM, Gather-Excite, SK, Split
Attention, CondConv, Dynamic Conv) inside HaloNet and inside a ResNet: each spatial mixer in
place of the block's attention or 3x3 conv, and each channel attention (and BAM) added to the
baseline's blocks.

  attention_modules.py:paper           inside H1 (ImageNet)
  attention_modules.py:paper,resnet50  inside ResNet-50 (configs/halonet.py:resnet50, ImageNet)
  attention_modules.py:cpu             inside the tiny HaloNet on the digits
  attention_modules.py:cpu,resnet      inside the tiny network with 3x3 convs, on the digits

At CPU scale SASA (3 x 3 windows) replaces stages 1-2 only: the later maps are smaller than any
window. Global attention (BoTNet) replaces the last stage's mixer only, as BoTNet places it:
all-pairs attention over a stage-1 map of 64 x 64 would need 16 M logits per head and image.
"""

import ml_collections

from configs.sweeps import common

MIXERS = ('halo', 'sasa', 'conv', 'sk', 'split', 'condconv', 'dynamic')
GATES = ('se', 'eca', 'cbam', 'ge_minus', 'ge', 'ge_plus')
BACKBONES = ('halonet', 'resnet50', 'resnet')


def get_config(arg: str = 'paper') -> ml_collections.ConfigDict:
  """`SCALE` or `SCALE,BACKBONE`: paper or cpu; halonet (default), resnet50 (paper) or resnet
  (cpu)."""
  scale, _, backbone = arg.partition(',')
  backbone = backbone or 'halonet'
  if backbone not in BACKBONES or (
    backbone != 'halonet' and (backbone == 'resnet') != (scale == 'cpu')
  ):
    raise ValueError(
      f'attention_modules.py:{arg}: the backbone is halonet, or resnet50 at paper scale and '
      'resnet at cpu scale'
    )
  config = common.sweep_config(scale)
  if backbone == 'resnet50':
    config.base = 'configs/halonet.py:resnet50'
  baseline = 'halo' if backbone == 'halonet' else 'conv'
  config.base_overrides['model'] = {'mixers': (baseline,) * 4}
  points = [{}]
  points += [{'model.mixers': (mixer,) * 4} for mixer in MIXERS if mixer not in (baseline, 'sasa')]
  if scale == 'cpu':  # The digits' maps (8, 4, 2, 1 at 32 px) take 3 x 3 windows in stages 1-2.
    points.append({'model.mixers': ('sasa', 'sasa', baseline, baseline), 'model.sasa_window': 3})
  else:
    points.append({'model.mixers': ('sasa',) * 4})
  points.append({'model.mixers': (baseline,) * 3 + ('global',)})
  points += [{'model.channel_attention': (gate,) * 4} for gate in GATES]
  points.append({'model.stage_attention': 'bam'})
  config.points = tuple(points)
  return config
