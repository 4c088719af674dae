"""A finished sweep's table and picture: results.csv, results.json and results.png.

One row per point: its swept values (typed), the model's params, GFLOPs and attention window,
and the point's final results. The plot has one panel per swept key (top-1 against that key's
values, numbers on a numeric axis, anything else as categories, one line per combination of the
other swept keys) and one against GFLOPs.
"""

import csv
import io
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import ml_collections
import numpy as np

from halonet import paths
from halonet.models import halonet as model
from halonet.models import networks
from halonet.tools import variants as summary
from halonet.train import workdir as workdir_lib

# Axis labels for the paper's ablation knobs; other keys use their dotted name.
AXIS_LABELS = {
  'model.block_size': 'block size b (pixels)',
  'model.halo_size': 'halo size h (pixels)',
  'model.conv_stages': 'stages with convolutions',
  'model.mask_window': 'mask window k (pixels; 0 = none)',
  'model.use_se': 'squeeze-excite',
  'model.activation': 'activation',
  'label_smoothing': 'label smoothing',
  'input.randaugment_magnitude': 'RandAugment M',
}


def window_size(config: ml_collections.ConfigDict) -> int | None:
  """Largest b + 2h over the attention stages (None when every stage is a conv)."""
  windows = [
    b + 2 * h
    for stage, (b, h) in enumerate(model.stage_windows(config.model), 1)
    if stage not in config.model.conv_stages
  ]
  return max(windows, default=None)


def _significant(x: float) -> float:
  return float(f'{x:.4g}')


def collect_row(
  name: str, config: ml_collections.ConfigDict, workdir: str, keys: list[str]
) -> dict[str, Any]:
  """The point's values of the swept `keys`, its model cost and its final results."""
  results = workdir_lib.read_results(workdir)
  flat = config.to_dict()
  value = lambda key: _get(flat, key)
  # The summary's own pieces at 4 significant digits: its 3 decimals flatten CPU-scale models.
  row = {
    'point': name,
    **{k: value(k) for k in keys},
    'params_m': _significant(networks.count_params(config) / 1e6),
    'gflops': _significant(summary.gflops_per_image(config)),
    'neighbourhood': summary.neighbourhood(config),
    'window': window_size(config),
    'step': results['step'],
  }
  for group, prefix in (('raw_eval', 'top1'), ('ema_eval', 'top1_ema')):
    for split, metrics in results.get(group, {}).items():
      row[f'{prefix}_{split}'] = round(metrics['top1'], 2)
  images_per_sec = results.get('train_images_per_sec')
  row['train_images_per_sec'] = None if images_per_sec is None else round(images_per_sec, 1)
  return row


def over_seeds(runs: list[dict[str, Any]], groups: list[str]) -> list[dict[str, Any]]:
  """One row per point from its runs over seeds: top-1 columns as the mean, with `<col>_std`
  (sample standard deviation) beside them, the seeds' count, and the point's own name."""
  by_point: dict[str, list[dict[str, Any]]] = {}
  for run, group in zip(runs, groups):
    by_point.setdefault(group, []).append(run)
  rows = []
  for group, point_runs in by_point.items():
    row = {**point_runs[0], 'point': group, 'seeds': len(point_runs)}
    for column in [c for c in row if c.startswith('top1')]:
      values = np.array([r[column] for r in point_runs], float)
      row[column] = round(float(values.mean()), 2)
      row[f'{column}_std'] = round(float(values.std(ddof=1)), 2) if len(values) > 1 else 0.0
    speeds = [r['train_images_per_sec'] for r in point_runs if r['train_images_per_sec']]
    row['train_images_per_sec'] = round(float(np.mean(speeds)), 1) if speeds else None
    rows.append(row)
  return rows


def _get(tree: dict[str, Any], key: str) -> Any:
  for part in key.split('.'):
    tree = tree[part]
  return tuple(tree) if isinstance(tree, list) else tree


def _cell(value: Any) -> str:
  """A value as the CSV shows it: tuples as '1_2' ('none' when empty), the rest as str."""
  if isinstance(value, tuple):
    return '_'.join(str(v) for v in value) or 'none'
  return str(value)


# More points than this, some swept value not a number: one bar per point.
MAX_LINES = 8


def plot(
  rows: list[dict[str, Any]], keys: list[str], labels: list[str], metric: str, title: str, path: str
) -> None:
  """Top-1 against each swept key (one line per combination of the other swept keys) and
  against GFLOPs (each point labelled).

  A bare Figure renders with Agg and leaves pyplot's global backend alone.
  """
  rows_labels = [(r, label) for r, label in zip(rows, labels) if r.get(metric) is not None]
  # Many named variants (e.g. one module each) read as one bar per point, not as lines per key.
  as_bars = len(rows_labels) > MAX_LINES and any(
    not isinstance(r[k], (int, float)) or isinstance(r[k], bool)
    for r, _ in rows_labels
    for k in keys
  )
  panels = 1 if as_bars else len(keys)
  fig = Figure(figsize=(4.5 * (panels + 1), max(4.2, 0.3 * len(rows_labels)) if as_bars else 4.2))
  fig.suptitle(title, fontsize=10)
  axes = fig.subplots(1, panels + 1, squeeze=False)[0]
  if as_bars:
    ys = range(len(rows_labels))
    axes[0].barh(
      ys,
      [r[metric] for r, _ in rows_labels],
      xerr=[r.get(f'{metric}_std', 0) for r, _ in rows_labels],
      capsize=3,
    )
    axes[0].set_yticks(ys, [label for _, label in rows_labels], fontsize=7)
    axes[0].invert_yaxis()
    low = min(r[metric] for r, _ in rows_labels)
    axes[0].set_xlim(max(0.0, low - 5), None)
    axes[0].set_xlabel(f'{metric} (%)')
    keys = []
  for ax, key in zip(axes, keys):
    values = [r[key] for r, _ in rows_labels]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    categories = list(dict.fromkeys(_cell(v) for v in values))
    position = (lambda v: v) if numeric else (lambda v: categories.index(_cell(v)))
    others = [k for k in keys if k != key]
    lines: dict[str, list[tuple[Any, float, float]]] = {}
    for r, _ in rows_labels:
      name = ', '.join(f'{k.rsplit(".", 1)[-1]}={_cell(r[k])}' for k in others)
      lines.setdefault(name, []).append((position(r[key]), r[metric], r.get(f'{metric}_std', 0)))
    for name, points in lines.items():
      xs, ys, errors = zip(*sorted(points))
      # Error bars: the standard deviation over seeds, when the sweep has seeds.
      ax.errorbar(xs, ys, yerr=errors, marker='o', capsize=3, label=name or None)
    if others:
      ax.legend(fontsize=7)
    if numeric:
      ax.xaxis.set_major_locator(
        MaxNLocator(nbins=6, integer=all(isinstance(v, int) for v in values))
      )
    else:
      ax.set_xticks(range(len(categories)), categories)
      ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_xlabel(AXIS_LABELS.get(key, key))
  flops_ax = axes[-1]
  for r, label in rows_labels:
    flops_ax.errorbar(
      r['gflops'],
      r[metric],
      yerr=r.get(f'{metric}_std', 0),
      marker='o',
      color='tab:blue',
      capsize=3,
    )
    flops_ax.annotate(
      label, (r['gflops'], r[metric]), xytext=(3, 3), textcoords='offset points', fontsize=7
    )
  flops_ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
  flops_ax.ticklabel_format(axis='x', style='sci', scilimits=(-2, 4))
  flops_ax.set_xlabel('GFLOPs per image')
  for ax in axes[1:] if as_bars else axes:
    ax.set_ylabel(f'{metric} (%)')
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=120)


def write_results(
  rows: list[dict[str, Any]],
  overrides: list[dict[str, Any]],
  labels: list[str],
  keys: list[str],
  title: str,
  workdir: str,
  extra: dict[str, Any],
) -> None:
  """results.csv, results.json (typed values, each point's overrides, `extra`) and
  results.png in `workdir`."""
  columns = list(dict.fromkeys(k for r in rows for k in r))
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, fieldnames=columns)
  writer.writeheader()
  writer.writerows([{k: '' if v is None else _cell(v) for k, v in r.items()} for r in rows])
  paths.write_bytes(workdir_lib.file(workdir, 'results.csv'), table.getvalue().encode())
  paths.write_json(
    workdir_lib.file(workdir, workdir_lib.RESULTS),
    {**extra, 'rows': [{**r, 'overrides': o} for r, o in zip(rows, overrides)]},
  )
  # The first eval split with the raw params: the one every point has.
  metric = next(c for c in columns if c.startswith('top1_') and not c.endswith('_std'))
  plot(rows, keys, labels, metric, title, workdir_lib.file(workdir, 'results.png'))
