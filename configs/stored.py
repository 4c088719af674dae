"""The config a run stored in its workdir: `--config=configs/stored.py:WORKDIR`.

eval.py uses it when no --config is given, so `python eval.py --workdir=W` evaluates W's run as
it was trained; --config.* overrides still apply on top. Fields added to the configs since the
run keep their defaults.
"""

import os

import ml_collections
from flax import traverse_util

from configs import halonet
from halonet import checkpointing


def get_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no {path}: pass --config, or a workdir that train.py wrote')
  stored = traverse_util.flatten_dict(checkpointing.read_json(path), sep='.')
  config = halonet.base_config()
  # JSON turned the config's tuples into lists.
  config.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v
                                     for k, v in stored.items()})
  return config
