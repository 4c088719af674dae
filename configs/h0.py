"""HaloNet-H0, the paper's row: the same config as --config=configs/halonet.py:h0."""

from configs import halonet


def get_config():
  return halonet.get_config('h0')
