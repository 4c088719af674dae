"""Block size b x halo h (the paper's window ablation): accuracy grows with the window b + 2h.

b stays even because stages 2-4 attend with stride 2. At 32 px the CPU scale's stage maps are
8, 4, 2 and 1 pixels wide, so b in {2, 4} and h in {0, 1, 2} span windows from 2 to 8.
"""

import ml_collections

from configs.sweeps import common


def get_config(scale: str = 'paper') -> ml_collections.ConfigDict:
  config = common.sweep_config(scale)
  if scale == 'cpu':
    config.grid = {'model': {'block_size': (2, 4), 'halo_size': (0, 1, 2)}}
  else:
    config.grid = {'model': {'block_size': (4, 6, 8, 10, 12), 'halo_size': (0, 1, 2, 3)}}
  return config
