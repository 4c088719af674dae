"""Ablation sweeps: a base config and override points, one sub-workdir each, one table and plot.

A sweep file (`configs/sweeps/*.py`) returns a ConfigDict with
  base:            a config file as train.py takes it, e.g. 'configs/h1.py' (or 'file.py:arg').
  base_overrides:  applied to every point; a nested mapping shaped like the config.
  grid:            candidate values per field (nested mapping); the points are their product.
  points:          a tuple of override dicts with dotted keys, e.g. {'model.use_se': True}.
Every listed point is crossed with every grid point. Nested mappings flatten to dotted paths
('model.block_size'), which name the sub-workdirs and become train.py's --config.* flags.
"""

import csv
import dataclasses
import importlib.util
import itertools
import os
import re
import shlex
from collections.abc import Mapping
from typing import Any

import jax
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import ml_collections

from halonet import checkpointing
from halonet import model
from halonet import summary
from halonet import train_lib

# Short names for the paper's ablation knobs in plot labels; other keys use their last part.
_SHORT_KEYS = {'model.block_size': 'b', 'model.halo_size': 'h', 'model.conv_stages': 'conv',
               'model.mask_window': 'mask', 'model.use_se': 'SE', 'model.activation': 'act',
               'label_smoothing': 'LS', 'randaugment_layers': 'RA_n',
               'randaugment_magnitude': 'RA_m'}
_UNSAFE = re.compile(r'[^A-Za-z0-9._=,+-]')


@dataclasses.dataclass
class Point:
  """One run of a sweep."""
  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict
  workdir: str


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, or `get_config(arg)` for 'file.py:arg', as config_flags."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'no config file {path!r}')
  module_spec = importlib.util.spec_from_file_location('_sweep_base_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def flatten(overrides: Mapping[str, Any] | ml_collections.ConfigDict,
            prefix: str = '') -> dict[str, Any]:
  """Nested and/or dotted override mappings -> {dotted path: value}."""
  flat = {}
  for key, value in overrides.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = tuple(value) if isinstance(value, list) else value
  return flat


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
  return ','.join(f'{_SHORT_KEYS.get(k, k.rsplit(".", 1)[-1])}={_name_value(v)}'
                  for k, v in overrides.items())


def check_key(config: ml_collections.ConfigDict, key: str, source: str) -> None:
  """Fails with one line naming `key` unless it is a (leaf) field of `config`."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f'sweep override key {key!r} is not a field of {source}')
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise ValueError(f'sweep override key {key!r} names a group of fields in {source}, not one')


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with checked keys set; a value of the wrong type fails naming it."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f'sweep override {key}={value!r}: {e}') from None
  return config


def build_points(sweep: ml_collections.ConfigDict, workdir: str) -> list[Point]:
  """Every point's config; all keys, then every point's model, are checked before any run."""
  base_config = load_config(sweep.base)
  common = flatten(sweep.get('base_overrides', {}))
  all_overrides = expand_points(sweep)
  for key in dict.fromkeys(list(common) + [k for o in all_overrides for k in o]):
    check_key(base_config, key, sweep.base)
  points = []
  for overrides in all_overrides:
    name = point_name(overrides)
    if any(p.name == name for p in points):
      raise ValueError(f'sweep point {name} appears twice')
    config = apply_overrides(base_config, {**common, **overrides})
    try:
      model.validate_config(config)
    except ValueError as e:
      raise ValueError(f'sweep point {name}: {e}') from None
    points.append(Point(name, overrides, config, os.path.join(workdir, name)))
  return points


def launch_command(sweep: ml_collections.ConfigDict, point: Point) -> str:
  """The train.py command line that runs `point` alone (for a TPU/GPU scheduler)."""
  overrides = {**flatten(sweep.get('base_overrides', {})), **point.overrides}
  args = ['python', 'train.py', f'--config={sweep.base}', f'--workdir={point.workdir}']
  # str() writes tuples as '(1, 2)', which config_flags parses back.
  args += [f'--config.{k}={v}' for k, v in overrides.items()]
  return ' '.join(shlex.quote(a) for a in args)


def is_finished(point: Point) -> bool:
  """Its results.json reports the final step (an interrupted point reports an earlier one)."""
  path = os.path.join(point.workdir, 'results.json')
  if not os.path.exists(path):
    return False
  return checkpointing.read_json(path)['step'] >= train_lib.total_train_steps(point.config)


def run_points(points: list[Point]) -> bool:
  """Trains each unfinished point in turn (resuming its checkpoint); False if preempted."""
  for i, point in enumerate(points, 1):
    if is_finished(point):
      print(f'[{i}/{len(points)}] {point.name}: finished, skipped', flush=True)
      continue
    print(f'[{i}/{len(points)}] {point.name}: training in {point.workdir}', flush=True)
    if train_lib.train_and_evaluate(point.config, point.workdir).get('preempted'):
      print(f'preempted during {point.name}; rerun the same command to resume', flush=True)
      return False
  return True


def window_size(config: ml_collections.ConfigDict) -> int | None:
  """Largest b + 2h over the attention stages (None when every stage is a conv)."""
  windows = [b + 2 * h for stage, (b, h) in enumerate(model.stage_windows(config.model), 1)
             if stage not in config.model.conv_stages]
  return max(windows, default=None)


def _significant(x: float) -> float:
  return float(f'{x:.4g}')


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split('.'):
    config = config[part]
  return config


def collect_row(point: Point, keys: list[str]) -> dict[str, Any]:
  """The point's values of the swept `keys`, its model cost and its final results."""
  results = checkpointing.read_json(os.path.join(point.workdir, 'results.json'))
  # The summary's own pieces at 4 significant digits: its 3 decimals flatten CPU-scale models.
  row = {'point': point.name, **{k: str(_value(point.config, k)) for k in keys},
         'params_m': _significant(model.count_params(point.config) / 1e6),
         'gflops': _significant(summary.gflops_per_image(point.config)),
         'neighbourhood': summary.neighbourhood(point.config),
         'window': window_size(point.config), 'step': results['step']}
  for name, prefix in (('raw_eval', 'top1'), ('ema_eval', 'top1_ema')):
    for split, metrics in results.get(name, {}).items():
      row[f'{prefix}_{split}'] = round(metrics['top1'], 2)
  images_per_sec = results.get('train_images_per_sec')
  row['train_images_per_sec'] = None if images_per_sec is None else round(images_per_sec, 1)
  return row


def _columns(rows: list[dict[str, Any]]) -> list[str]:
  return list(dict.fromkeys(k for r in rows for k in r))


def format_table(rows: list[dict[str, Any]]) -> str:
  """Fixed-width text table, one column per field."""
  columns = _columns(rows)
  cells = [['' if r.get(c) is None else str(r[c]) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  lines = ['  '.join(c.ljust(w) for c, w in zip(columns, widths))]
  lines.append('-' * len(lines[0]))
  lines += ['  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
  return '\n'.join(lines)


def plot(rows: list[dict[str, Any]], labels: list[str], metric: str, title: str,
         path: str) -> None:
  """Top-1 against window size (b+2h) and against GFLOPs, each point labelled.

  A bare Figure renders with Agg and leaves pyplot's global backend alone.
  """
  fig = Figure(figsize=(12, 4.5))
  fig.suptitle(title, fontsize=9)
  axes = fig.subplots(1, 2)
  for ax, x_key, x_label in ((axes[0], 'window', 'attention window b + 2h (pixels)'),
                             (axes[1], 'gflops', 'GFLOPs per image')):
    for row, label in zip(rows, labels):
      if row[x_key] is None or row.get(metric) is None:
        continue
      ax.scatter(row[x_key], row[metric], color='tab:blue')
      ax.annotate(label, (row[x_key], row[metric]), xytext=(3, 3), textcoords='offset points',
                  fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=x_key == 'window'))
    ax.set_xlabel(x_label)
    ax.set_ylabel(f'{metric} (%)')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_results(sweep: ml_collections.ConfigDict, points: list[Point],
                  workdir: str) -> list[dict[str, Any]]:
  """results.csv, results.json and results.png in `workdir`; returns the rows."""
  # Every swept key gets a column, so points that leave it at the base show the base value.
  keys = list(dict.fromkeys(k for p in points for k in p.overrides))
  rows = [collect_row(p, keys) for p in points]
  columns = _columns(rows)
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  checkpointing.write_json_atomic(os.path.join(workdir, 'results.json'), {
      'base': sweep.base,
      'base_overrides': flatten(sweep.get('base_overrides', {})),
      'rows': [{**r, 'overrides': p.overrides} for r, p in zip(rows, points)],
  })
  # The first eval split with the raw params: the one every point has.
  metric = next(c for c in columns if c.startswith('top1_'))
  title = f'{os.path.basename(os.path.abspath(workdir))}: {sweep.base}'
  plot(rows, [point_label(p.overrides) for p in points], metric, title,
       os.path.join(workdir, 'results.png'))
  return rows


def run_sweep(sweep: ml_collections.ConfigDict, points: list[Point],
              workdir: str) -> list[dict[str, Any]] | None:
  """Trains the unfinished points (from build_points), then writes and prints the table.

  Returns the rows (process 0), or None when preempted: rerunning resumes where it stopped.
  """
  if not run_points(points):
    return None
  if jax.process_index() != 0:
    return None
  rows = write_results(sweep, points, workdir)
  print(format_table(rows), flush=True)
  return rows
