"""Ablation sweeps: a base config and override points, each trained in its own sub-workdir.

A sweep file (`configs/sweeps/*.py`) returns a ConfigDict with
  base:            a config file as train.py takes it, e.g. 'configs/h1.py' (or 'file.py:arg').
  base_overrides:  applied to every point; a nested mapping shaped like the config.
  grid:            candidate values per field (nested mapping); the points are their product.
  points:          a tuple of override dicts with dotted keys, e.g. {'model.use_se': True}.
  seeds:           optional; every point is trained once per seed (config.seed) and reported
                   as the mean and standard deviation over them.
Every listed point is crossed with every grid point. Nested mappings flatten to dotted paths
('model.block_size'), which name the sub-workdirs and become train.py's --config.* flags. The
table and plot of a finished sweep are halonet/tools/sweep_report.py's.
"""

from collections.abc import Mapping
import dataclasses
import importlib.util
import itertools
import re
import shlex
import time
from typing import Any

from flax import traverse_util
import jax
import ml_collections

from halonet import console
from halonet import errors
from halonet import paths
from halonet import text_table
from halonet.data import sources as data_sources
from halonet.tools import point_log
from halonet.tools import sweep_report
from halonet.train import config_checks
from halonet.train import loop as train_lib
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib

# Short names for the paper's ablation knobs in point labels; other keys use their last part.
_SHORT_KEYS = {
  'model.block_size': 'b',
  'model.halo_size': 'h',
  'model.conv_stages': 'conv',
  'model.mask_window': 'mask',
  'model.use_se': 'SE',
  'model.activation': 'act',
  'label_smoothing': 'LS',
  'input.randaugment_layers': 'RA_n',
  'input.randaugment_magnitude': 'RA_m',
}
POINT_LOG = 'train.log'  # Each point's training output, in its sub-workdir.
_UNSAFE = re.compile(r'[^A-Za-z0-9._=,+-]')


@dataclasses.dataclass
class Point:
  """One run of a sweep: `overrides` name the point, `name` the run (with its seed, if any)."""

  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict
  workdir: str
  group: str = ''  # point_name(overrides): the runs of one point over seeds share it.


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, or `get_config(arg)` for 'file.py:arg', as config_flags."""
  path, _, arg = spec.partition(':')
  if not paths.path(path).is_file():
    raise errors.ConfigError(f'no config file {path!r}')
  module_spec = importlib.util.spec_from_file_location('_sweep_base_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def flatten(overrides: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """Nested and/or dotted override mappings -> {dotted path: value} (lists as tuples)."""
  if isinstance(overrides, ml_collections.ConfigDict):
    overrides = overrides.to_dict()
  flat = traverse_util.flatten_dict(dict(overrides), sep='.')
  return {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}


def expand_points(sweep: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """One override dict per point: listed points x grid product (grid keys sorted)."""
  listed = [flatten(p) for p in sweep.get('points', ())] or [{}]
  grid = flatten(sweep.get('grid', {}))
  combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  return [{**p, **g} for p in listed for g in combos]


def _name_value(value: Any) -> str:
  if isinstance(value, tuple):
    return '_'.join(str(v) for v in value) or 'none'
  return str(value)


def point_name(overrides: Mapping[str, Any]) -> str:
  """Filesystem-safe sub-workdir name, e.g. 'model.block_size=8,model.halo_size=3'."""
  if not overrides:
    return 'base'
  return _UNSAFE.sub('_', ','.join(f'{k}={_name_value(v)}' for k, v in overrides.items()))


def point_label(overrides: Mapping[str, Any]) -> str:
  """Short plot label, e.g. 'b=8,h=3'."""
  if not overrides:
    return 'base'
  return ','.join(
    f'{_SHORT_KEYS.get(k, k.rsplit(".", 1)[-1])}={_name_value(v)}' for k, v in overrides.items()
  )


def check_key(config: ml_collections.ConfigDict, key: str, source: str) -> None:
  """Fails with one line naming `key` unless it is a (leaf) field of `config`."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise errors.ConfigError(f'sweep override key {key!r} is not a field of {source}')
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise errors.ConfigError(
      f'sweep override key {key!r} names a group of fields in {source}, not one'
    )


def build_points(sweep: ml_collections.ConfigDict, workdir: str) -> list[Point]:
  """Every point's config; all keys, then every point's model, are checked before any run."""
  base_config = load_config(sweep.base)
  common = flatten(sweep.get('base_overrides', {}))
  all_overrides = expand_points(sweep)
  for key in dict.fromkeys(list(common) + [k for o in all_overrides for k in o]):
    check_key(base_config, key, sweep.base)
  seeds = [{'seed': seed} for seed in sweep.get('seeds', ())] or [{}]
  points = []
  for overrides, seed in itertools.product(all_overrides, seeds):
    name = point_name({**overrides, **seed})
    if any(p.name == name for p in points):
      raise errors.ConfigError(f'sweep point {name} appears twice')
    config = base_config.copy_and_resolve_references()
    for key, value in {**common, **overrides, **seed}.items():
      try:
        config.update_from_flattened_dict({key: value})
      except TypeError as e:  # ConfigDict refuses a value of another type.
        raise errors.ConfigError(f'sweep override {key}={value!r}: {e}') from None
    try:
      config_checks.validate_values(config)
    except ValueError as e:
      raise errors.ConfigError(f'sweep point {name}: {e}') from None
    points.append(
      Point(name, overrides, config, workdir_lib.file(workdir, name), point_name(overrides))
    )
  return points


def launch_command(sweep: ml_collections.ConfigDict, point: Point) -> str:
  """The train.py command line that runs `point` alone (for a TPU/GPU scheduler)."""
  overrides = {**flatten(sweep.get('base_overrides', {})), **point.overrides}
  if sweep.get('seeds'):
    overrides['seed'] = point.config.seed
  args = ['python', 'train.py', f'--config={sweep.base}', f'--workdir={point.workdir}']
  # str() writes tuples as '(1, 2)', which config_flags parses back.
  args += [f'--config.{k}={v}' for k, v in overrides.items()]
  return ' '.join(shlex.quote(a) for a in args)


def is_finished(point: Point) -> bool:
  """Its results.json reports the final step (an interrupted point reports an earlier one)."""
  results = workdir_lib.read_results(point.workdir)
  if not results:
    return False
  train_examples = data_sources.num_examples(
    point.config.input, point.config.input.train_split, point.config.num_classes
  )
  return results['step'] >= train_step_lib.total_train_steps(point.config, train_examples)


def _eval_summary(results: dict[str, Any]) -> str:
  """'test top-1 97.21%' for each evaluated split (raw parameters, then the EMA's if any)."""
  parts = [
    f'{split} top-1 {r["top1"]:.2f}%' + (' (EMA)' if name == 'ema' else '')
    for name in ('raw', 'ema')
    for split, r in results.get(f'{name}_eval', {}).items()
  ]
  return ', '.join(parts) or 'not evaluated'


def run_points(points: list[Point]) -> bool:
  """Trains each unfinished point in turn (resuming its checkpoint); False if preempted.

  The terminal gets one line as a point starts and one as it ends; its training output goes to
  `POINT_LOG` in its sub-workdir (appended to on a resume)."""
  for i, point in enumerate(points, 1):
    tag = f'[{i}/{len(points)}] {point.name}'
    if is_finished(point):
      earlier = workdir_lib.read_results(point.workdir)
      console.say(f'{tag}: finished earlier, skipped ({_eval_summary(earlier)})')
      continue
    log = workdir_lib.file(point.workdir, POINT_LOG)
    started = workdir_lib.stored_config(point.workdir) is not None
    console.say(f'{tag}: {"resumed" if started else "started"}, log in {log}')
    begin = time.perf_counter()
    with point_log.stdout_to(log):
      results = train_lib.train_and_evaluate(point.config, point.workdir)
    if results.get('preempted'):
      console.say(f'{tag}: preempted at step {results["step"]}; rerun the command to resume')
      return False
    console.say(f'{tag}: done in {time.perf_counter() - begin:.0f} s, {_eval_summary(results)}')
  return True


def run_sweep(
  sweep: ml_collections.ConfigDict, points: list[Point], workdir: str, title: str = ''
) -> list[dict[str, Any]] | None:
  """Trains the unfinished points (from build_points), then writes and prints the table.

  Returns the rows (process 0), or None when preempted: rerunning resumes where it stopped.
  `title` names the sweep in the plot (default: the workdir's name).
  """
  if not run_points(points):
    return None
  if jax.process_index() != 0:
    return None
  # Every swept key gets a column, so points that leave it at the base show the base value.
  keys = list(dict.fromkeys(k for p in points for k in p.overrides))
  runs = [sweep_report.collect_row(p.name, p.config, p.workdir, keys) for p in points]
  extra = {'base': sweep.base, 'base_overrides': flatten(sweep.get('base_overrides', {}))}
  rows = runs
  if sweep.get('seeds'):
    rows = sweep_report.over_seeds(runs, [p.group for p in points])
    extra.update(seeds=list(sweep.seeds), runs=runs)
  firsts = list({p.group: p for p in points}.values())  # One per point, in order.
  sweep_report.write_results(
    rows,
    [p.overrides for p in firsts],
    [point_label(p.overrides) for p in firsts],
    keys,
    title or paths.path(paths.as_string(workdir)).name,
    workdir,
    extra,
  )
  console.say(text_table.format_table(rows))
  return rows
