"""The unit tests' model on 32 px digits: the same config as --config=configs/halonet.py:tiny."""

from configs import halonet


def get_config():
  return halonet.get_config('tiny')
