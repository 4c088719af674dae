"""Masking each query's neighbourhood to a (2h+1) x (2h+1) window around it (the paper's
mask ablation: b=8, h=3, a 14x14 neighbourhood against a 7x7 mask, same parameters and FLOPs).

At the CPU scale, b=4, h=2: an 8x8 neighbourhood against a 5x5 mask.
"""

import ml_collections

from configs.sweeps import common


def get_config(scale: str = 'paper') -> ml_collections.ConfigDict:
  config = common.sweep_config(scale)
  b, h = (4, 2) if scale == 'cpu' else (8, 3)
  config.base_overrides.update({'model': {'block_size': b, 'halo_size': h}})
  config.grid = {'model': {'mask_window': (0, 2 * h + 1)}}
  return config
