"""The offline quick-start on 2 CPU cores: the same config as --config=configs/halonet.py:quickstart."""

from configs import halonet


def get_config():
  return halonet.get_config('quickstart')
