"""The config a run stored in its workdir: `--config=configs/stored.py:WORKDIR`.

eval.py uses it when no --config is given, so `python eval.py --workdir=W` evaluates W's run as
it was trained; --config.* overrides still apply on top. Fields added to the configs since the
run keep their defaults (halonet/train/workdir.py).
"""

import ml_collections

from halonet.train import workdir


def get_config(run_workdir: str) -> ml_collections.ConfigDict:
  return workdir.load_config(run_workdir)
