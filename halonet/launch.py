"""What train.py and eval.py share: the --config/--workdir/--distributed flags and start-up."""

import sys
from collections.abc import Sequence

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from halonet import checkpointing

FLAGS = flags.FLAGS


def define_flags(workdir_help: str) -> None:
  """--config (any field overridable, typos refused), --workdir, --distributed."""
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.DEFINE_bool('distributed', False,
                    'Call jax.distributed.initialize() first (multi-host pods).')
  flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with an unknown --config.field reported in one line, not a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:  # What absl's own parser reports, e.g. a value of the wrong type.
    sys.exit(f'FATAL Flags parsing error: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections: no such field in the locked config.
    message = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').replace("'", '').split())
    sys.exit(f'FATAL Flags parsing error: unknown config field: {message}')


def start(argv: Sequence[str]) -> None:
  """Rejects stray arguments, quiets Orbax, joins the pod's processes when asked."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  checkpointing.quiet_orbax_info_logs()
  if FLAGS.distributed:
    jax.distributed.initialize()
