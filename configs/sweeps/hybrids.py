"""Convolutions instead of attention in the early stages (the paper's hybrid ablation)."""

import ml_collections

from configs.sweeps import common


def get_config(scale: str = 'paper') -> ml_collections.ConfigDict:
  config = common.sweep_config(scale)
  config.grid = {'model': {'conv_stages': ((), (1,), (1, 2), (1, 2, 3))}}
  return config
