"""The paper's regulariser and architecture rows: label smoothing (LS), RandAugment (RA),
squeeze-excite (SE) and SiLU, added one by one to a baseline with none of them.

RA is 2 layers at magnitude 10 (the base config's); the baseline keeps 2 layers at magnitude 0,
which the input pipeline treats as off.
"""

import ml_collections

from configs.sweeps import common

_LS = {'label_smoothing': 0.1}
_RA = {'input.randaugment_magnitude': 10}
_SE = {'model.use_se': True}
_SILU = {'model.activation': 'silu'}


def get_config(scale: str = 'paper') -> ml_collections.ConfigDict:
  config = common.sweep_config(scale)
  config.base_overrides.update(
    {
      'label_smoothing': 0.0,
      'input': {'randaugment_layers': 2, 'randaugment_magnitude': 0},
      'model': {'use_se': False, 'activation': 'relu'},
    }
  )
  config.points = (
    {},  # baseline
    {**_LS},  # +LS
    {**_LS, **_RA},  # +LS +RA
    {**_SE},  # +SE
    {**_SE, **_SILU},  # +SE +SiLU
    {**_LS, **_SE},  # +LS +SE
    {**_LS, **_SE, **_SILU},  # +LS +SE +SiLU
    {**_LS, **_SE, **_SILU, **_RA},  # +LS +SE +SiLU +RA
  )
  return config
