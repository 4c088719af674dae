"""HaloNet-H5, the paper's row: the same config as --config=configs/halonet.py:h5."""

from configs import halonet


def get_config():
  return halonet.get_config('h5')
