"""HaloNet-H1, the paper's row: the same config as --config=configs/halonet.py:h1."""

from configs import halonet


def get_config():
  return halonet.get_config('h1')
