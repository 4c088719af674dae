"""The offline quick-start on 2 CPU cores: --config=configs/halonet.py:quickstart, by name."""

from configs import halonet


def get_config():
  return halonet.get_config('quickstart')
