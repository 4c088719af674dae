"""Runs an ablation sweep point by point, then writes results.csv/.json/.png in the workdir.

    python sweep.py --sweep=configs/sweeps/window.py:cpu --workdir=/tmp/window   # minutes, CPU
    python sweep.py --sweep=configs/sweeps/window.py --workdir=DIR --dry_run     # H1, ImageNet

Each point trains in DIR/<its overrides>; finished points are skipped and interrupted ones resume,
so rerunning the same command continues a sweep. --dry_run prints one train.py command per point
for a cluster scheduler; rerun without it once they finish to collect the table and plot.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from halonet.train import launch

_SWEEP = config_flags.DEFINE_config_file(
  'sweep',
  None,
  'Sweep file (configs/sweeps/*.py); append :cpu for its CPU scale.',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'One sub-workdir per point, plus the results.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the launch commands; run nothing.')
flags.mark_flags_as_required(['sweep', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  launch.quiet_logs()
  from halonet.tools import sweeps  # pylint: disable=g-import-not-at-top  # After --help and flags.

  try:
    points = sweeps.build_points(_SWEEP.value, _WORKDIR.value)
  except ValueError as e:
    # A bad key or value gets one line naming it, not a traceback.
    raise SystemExit(f'sweep.py: {e}') from None
  if _DRY_RUN.value:
    for point in points:
      print(sweeps.launch_command(_SWEEP.value, point))
    return
  # The plot's title names the sweep file (and scale) as typed, e.g. configs/sweeps/window.py:cpu.
  with launch.one_line_errors():
    sweeps.run_sweep(
      _SWEEP.value,
      points,
      _WORKDIR.value,
      title=config_flags.get_config_filename(flags.FLAGS['sweep']),
    )


if __name__ == '__main__':
  launch.run(main)
