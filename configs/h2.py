"""HaloNet-H2, the paper's row: the same config as --config=configs/halonet.py:h2."""

from configs import halonet


def get_config():
  return halonet.get_config('h2')
