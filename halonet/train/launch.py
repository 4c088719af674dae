"""What the commands share: how they run and end; for train.py and eval.py, the
--config/--workdir/--distributed flags and start-up."""

import os

# TensorFlow's C++ INFO/WARNING lines (oneDNN, GCS auth probes): set before anything imports TF.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import atexit
from collections.abc import Callable, Iterator, Sequence
import contextlib
import gc
import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from halonet import errors

HELP_FLAGS = ('--help', '-help', '-h', '--helpshort', '-?')

FLAGS = flags.FLAGS

# The youngest generation collected every 100,000 net allocations (CPython's default: 700); the
# older ones at CPython's ratios, so all are considered every 10 million.
COMMAND_GC_THRESHOLDS = (100_000, 10, 10)


def run(
  main: Callable[[list[str]], object],
  flags_parser: Callable[[list[str]], list[str]] = app.parse_flags_with_usage,
) -> None:
  """absl's app.run of a command's `main`, with CPython's garbage collector set for a command.

  The imports `main` makes (TensorFlow, JAX, Flax) create over half a million objects that live
  as long as the process; at CPython's default thresholds they set off eight full collections
  that free nothing (0.7 s of CPU). With young objects collected every 100,000 allocations
  instead of 700, none happens while importing; reference cycles made later are still collected,
  by the same rules at a larger scale.

  At exit CPython's last collections would walk every one of those objects (about 1 s) only to
  free memory the process hands back anyway. The rest of the exit is unchanged: atexit handlers
  run, output is flushed, objects no longer referenced are released; only reference cycles still
  alive then are left to the OS."""
  gc.set_threshold(*COMMAND_GC_THRESHOLDS)
  atexit.register(gc.freeze)
  app.run(main, flags_parser=flags_parser)


def define_flags(workdir_help: str) -> None:
  """--config (any field overridable, typos refused), --workdir, --distributed and the cluster
  flags."""
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Config file, e.g. configs/h1.py or configs/halonet.py:h7; override any '
    'field with --config.FIELD=VALUE.',
    lock_config=True,
  )
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.DEFINE_bool(
    'distributed',
    False,
    'Join the other processes of a multi-host run (jax.distributed.initialize) '
    'first. The cluster is detected on Cloud TPU, SLURM, Open MPI and k8s; '
    'elsewhere give the three flags below.',
  )
  flags.DEFINE_string(
    'coordinator_address',
    None,
    'With --distributed: HOST:PORT of process 0, reachable by every process.',
  )
  flags.DEFINE_integer(
    'num_processes', None, 'With --distributed: how many processes take part.', lower_bound=1
  )
  flags.DEFINE_integer(
    'process_id', None, 'With --distributed: this process, 0..num_processes-1.', lower_bound=0
  )
  flags.mark_flags_as_required(['config', 'workdir'])


def print_help() -> None:
  """The entry point's docstring, its flags and every config field with its default and meaning
  (halonet/defaults.py), then exit 0. Nothing heavy is imported, so it answers at once."""
  from halonet import defaults  # pylint: disable=g-import-not-at-top

  print((sys.modules['__main__'].__doc__ or '').strip() + '\n')
  print(FLAGS.main_module_help() + '\n')
  print('Config fields (override any with --config.FIELD=VALUE):')
  fields = defaults.field_help()
  width = max(len(f'{name} = {value!r}') for name, value, _ in fields)
  for name, value, meaning in fields:
    print(f'  {f"{name} = {value!r}":<{width}}  {meaning}')
  sys.exit(0)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing; a bad --config file or field is reported in one line, not a traceback.

  --help (exit 0) also lists the config fields."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    print_help()
  try:
    argv = FLAGS(argv)
    FLAGS.config.keys()  # Loaded lazily: a missing config file surfaces here.
    return argv
  except flags.Error as e:  # What absl's own parser reports, e.g. a value of the wrong type.
    lines = [line for line in str(e).splitlines() if line.strip()]
    if any(line.startswith('Traceback') for line in lines):  # The config file's get_config raised.
      lines = [lines[0], lines[-1]]
    sys.exit(f'FATAL Flags parsing error: {" ".join(lines)}')
  except (AttributeError, KeyError) as e:  # ml_collections: no such field in the locked config.
    message = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').replace("'", '').split())
    message = message.replace(' Did you mean', '. Did you mean')  # One sentence each.
    message = f'unknown config field: {message}{_moved_hint(argv)}'
    sys.exit(f'FATAL Flags parsing error: {message}{"" if message[-1] in ".?" else "."}')
  except OSError as e:  # The config file is missing or unreadable.
    while e.__cause__ is not None:
      e = e.__cause__
    sys.exit(f'FATAL --config: {" ".join(str(e).split())}')


def _moved_hint(argv: Sequence[str]) -> str:
  """Where an override of a field that moved into a group now goes (defaults.MOVED_FIELDS)."""
  from halonet import defaults  # pylint: disable=g-import-not-at-top

  for arg in argv[1:]:
    field = arg.removeprefix('--config.').split('=')[0]
    if arg.startswith('--config.') and field in defaults.MOVED_FIELDS:
      return f'; config.{field} is now config.{defaults.MOVED_FIELDS[field]}'
  return ''


def start(argv: Sequence[str]) -> None:
  """Rejects stray arguments, quiets Orbax, joins the pod's processes when asked."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_logs()
  cluster = cluster_flags()
  if FLAGS.distributed:
    import jax  # pylint: disable=g-import-not-at-top  # Not needed to parse flags or show help.

    jax.distributed.initialize(**cluster)
  elif cluster:
    sys.exit(f'FATAL {", ".join("--" + k for k in cluster)} given without --distributed')


def quiet_logs() -> None:
  """Library INFO chatter (Orbax, TFDS, clu) only when asked for with --verbosity."""
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    # gcsfs warns on every new bucket that it cannot tell its type without a storage-control
    # client, then uses the standard API, which is what it should do.
    std_logging.getLogger('gcsfs').setLevel(std_logging.ERROR)
  from halonet.train import checkpointing  # pylint: disable=g-import-not-at-top  # Imports Orbax.

  checkpointing.quiet_orbax()


def cluster_flags() -> dict[str, str | int]:
  """The cluster flags given: those left unset are detected by JAX."""
  names = ('coordinator_address', 'num_processes', 'process_id')
  given = {name: FLAGS[name].value for name in names if FLAGS[name].value is not None}
  if 'process_id' in given and given['process_id'] >= given.get('num_processes', float('inf')):
    sys.exit(
      f'FATAL --process_id={given["process_id"]} must be below '
      f'--num_processes={given["num_processes"]}'
    )
  return given


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """Bad input (errors.ConfigError, a missing file), a full disk and a diverged run end in one
  line naming the cause, not a traceback; anything else is a bug and keeps its traceback."""
  try:
    yield
  except (errors.ConfigError, errors.PeerTimeout, FileNotFoundError, FloatingPointError) as e:
    sys.exit(f'FATAL {e}')
  except errors.StorageOutage as e:
    # Threads of Orbax and TensorStore may still be retrying their own writes: nothing they
    # could still do is worth waiting for.
    print(f'FATAL {e}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
  except OSError as e:  # errors.DiskFull, or ENOSPC from a plain write.
    if not errors.is_disk_full(e):
      raise
    sys.exit(f'FATAL {e}')
