"""Params and FLOPs of H0-H7 (and any config) next to the paper's figures.

python summary.py                                  # H0-H7
python summary.py --config=configs/quickstart.py --json
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import halonet as named_configs
from halonet.models import paper
from halonet.train import launch

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Also summarise this config.', lock_config=True
)
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  launch.quiet_logs()  # JAX's INFO line about the TPU backend it looked for is not news.
  from halonet.tools import variants as summary  # pylint: disable=g-import-not-at-top  # After --help and flags.

  configs = [named_configs.get_config(name) for name in paper.VARIANTS]
  if _CONFIG.value is not None:
    configs.append(_CONFIG.value)
  rows = []
  for config in configs:  # Seconds each (H7 at 600 px the longest): say what is under way.
    print(f'counting the parameters and FLOPs of {config.variant}...', file=sys.stderr, flush=True)
    rows.append(summary.summarize(config))
  print(json.dumps(rows, indent=2) if _JSON.value else summary.format_rows(rows))


if __name__ == '__main__':
  launch.run(main)
