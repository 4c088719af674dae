"""Sweeps: every point checked before any runs, one launch command per point, finished points
skipped on a rerun, and one table row per point."""

import csv
import json
import os
import shlex
import subprocess
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from halonet.models import checks as model_checks
from halonet.tools import sweeps
from halonet.train import loop as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POINT_COUNTS = {
  ('window', 'paper'): 20,
  ('window', 'cpu'): 6,
  ('hybrids', 'paper'): 4,
  ('hybrids', 'cpu'): 4,
  ('masks', 'paper'): 2,
  ('masks', 'cpu'): 2,
  ('regularizers', 'paper'): 8,
  ('regularizers', 'cpu'): 8,
  ('attention_modules', 'paper'): 15,
  ('attention_modules', 'paper,resnet50'): 15,
  ('attention_modules', 'cpu'): 15,
  ('attention_modules', 'cpu,resnet'): 15,
}


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  # Sweep files name their base config relative to the repository root, as train.py does.
  monkeypatch.chdir(ROOT)


def _tiny_sweep(**fields) -> ml_collections.ConfigDict:
  sweep = ml_collections.ConfigDict()
  sweep.base = 'configs/tiny.py'
  sweep.base_overrides = {
    'num_train_steps': 2,
    'checkpoint_every_steps': 2,
    'eval_every_steps': 2,
    'eval_batch_size': 120,
  }
  sweep.update(fields)
  return sweep


def _no_training(*args, **kwargs):
  raise AssertionError('a point was trained')


@pytest.mark.parametrize('name,scale', sorted(POINT_COUNTS))
def test_shipped_sweeps_have_valid_points(name, scale):
  sweep = sweeps.load_config(f'configs/sweeps/{name}.py:{scale}')
  points = sweeps.build_points(sweep, '/sweep')
  assert len(points) == POINT_COUNTS[name, scale]
  dataset = 'digits' if scale.startswith('cpu') else 'imagenet2012'
  assert all(p.config.input.dataset == dataset for p in points)
  for point in points:  # Every point builds: its model settings pass the config's checks.
    model_checks.validate_config(point.config)


def test_points_cross_the_list_with_the_grid():
  sweep = _tiny_sweep(
    points=({'label_smoothing': 0.0}, {'label_smoothing': 0.2}),
    grid={'model': {'conv_stages': ((), (1, 2))}},
  )
  points = sweeps.build_points(sweep, '/sweep')
  assert [p.name for p in points] == [
    'label_smoothing=0.0,model.conv_stages=none',
    'label_smoothing=0.0,model.conv_stages=1_2',
    'label_smoothing=0.2,model.conv_stages=none',
    'label_smoothing=0.2,model.conv_stages=1_2',
  ]
  assert points[3].workdir == '/sweep/label_smoothing=0.2,model.conv_stages=1_2'
  assert points[3].config.label_smoothing == 0.2
  assert points[3].config.model.conv_stages == (1, 2)
  assert points[3].config.num_train_steps == 2  # base_overrides reach every point.


def test_bad_key_or_value_fails_before_any_point(tmp_path, monkeypatch):
  monkeypatch.setattr(train_lib, 'train_and_evaluate', _no_training)
  workdir = str(tmp_path / 'sweep')
  # The bad key is on the last point: it must still fail before the first one starts.
  sweep = _tiny_sweep(points=({}, {'model.blok_size': 4}))
  with pytest.raises(ValueError, match="'model.blok_size'"):
    sweeps.run_sweep(sweep, sweeps.build_points(sweep, workdir), workdir)
  sweep = _tiny_sweep(grid={'model': {'block_size': (4, 3)}})  # odd b cannot stride by 2.
  with pytest.raises(ValueError, match='model.block_size=3.*block_size=3'):
    sweeps.build_points(sweep, workdir)
  assert not os.path.exists(workdir)


def test_cli_names_a_bad_key_in_one_line(tmp_path):
  sweep_file = tmp_path / 'bad.py'
  sweep_file.write_text(
    'import ml_collections\n\n\ndef get_config():\n'
    "  return ml_collections.ConfigDict({'base': 'configs/tiny.py', 'grid': "
    "{'model': {'halo_sise': (1, 2)}}})\n"
  )
  workdir = tmp_path / 'sweep'
  result = subprocess.run(
    [sys.executable, 'sweep.py', f'--sweep={sweep_file}', f'--workdir={workdir}'],
    capture_output=True,
    text=True,
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
    "sweep.py: sweep override key 'model.halo_sise' is not a field of configs/tiny.py"
  )
  assert not workdir.exists()


def test_dry_run_prints_one_train_command_per_point(tmp_path):
  workdir = tmp_path / 'sweep'
  out = subprocess.run(
    [
      sys.executable,
      'sweep.py',
      '--sweep=configs/sweeps/hybrids.py:cpu',
      f'--workdir={workdir}',
      '--dry_run',
      '--sweep.base_overrides.input.data_dir=/data/digits',
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  commands = out.strip().splitlines()
  sweep = sweeps.load_config('configs/sweeps/hybrids.py:cpu')
  sweep.base_overrides.input.data_dir = '/data/digits'
  points = sweeps.build_points(sweep, str(workdir))
  assert all(p.config.input.data_dir == '/data/digits' for p in points)
  assert len(commands) == len(points) == 4
  assert not workdir.exists()
  for command, point in zip(commands, points):
    argv = shlex.split(command)
    assert argv[:2] == ['python', 'train.py']
    # train.py's own flags must rebuild exactly the point's config.
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
      'config', None, '', flag_values=flag_values, lock_config=True, sys_argv=argv[1:]
    )
    flags.DEFINE_string('workdir', None, '', flag_values=flag_values)
    flag_values(argv[1:])
    assert flag_values.workdir == point.workdir
    assert flag_values.config.to_dict() == point.config.to_dict()


def test_is_finished_only_at_the_final_step(tmp_path):
  (point,) = sweeps.build_points(_tiny_sweep(), str(tmp_path))
  assert not sweeps.is_finished(point)
  os.makedirs(point.workdir)
  for step, finished in ((1, False), (2, True)):
    with open(os.path.join(point.workdir, 'results.json'), 'w') as f:
      json.dump({'step': step}, f)
    assert sweeps.is_finished(point) == finished


def test_two_point_sweep_writes_results_and_skips_finished_points(tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path)
  sweep = _tiny_sweep(grid={'model': {'halo_size': (0, 1)}})
  rows = sweeps.run_sweep(sweep, sweeps.build_points(sweep, workdir), workdir)
  assert [r['point'] for r in rows] == ['model.halo_size=0', 'model.halo_size=1']
  # The terminal: a line as each point starts and one as it ends, then the table.
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == (
    f'[1/2] model.halo_size=0: started, log in {tmp_path}/model.halo_size=0/train.log'
  )
  assert lines[1].startswith('[1/2] model.halo_size=0: done in ')
  assert lines[1].endswith(f', test top-1 {rows[0]["top1_test"]:.2f}%')
  assert lines[2].startswith('[2/2] model.halo_size=1: started')
  assert lines[3].startswith('[2/2] model.halo_size=1: done in ')
  assert not any(line.startswith('step ') for line in lines)
  assert lines[4].split() == list(rows[0])  # The table's header.
  for r in rows:  # Each point's own log holds its training output.
    log = (tmp_path / r['point'] / 'train.log').read_text()
    assert 'step 2/2 loss ' in log and 'final test accuracy (raw params, step 2)' in log
  with open(tmp_path / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['model.halo_size'] for r in table] == ['0', '1']
  assert [r['window'] for r in table] == ['4', '6']  # b + 2h with b = 4.
  for r in table:
    assert r['step'] == '2'
    assert float(r['params_m']) > 0 and float(r['gflops']) > 0
    assert 0 <= float(r['top1_test']) <= 100 and float(r['train_images_per_sec']) > 0
  with open(tmp_path / 'results.json') as f:
    assert [r['overrides'] for r in json.load(f)['rows']] == [
      {'model.halo_size': h} for h in (0, 1)
    ]
  assert (tmp_path / 'results.png').stat().st_size > 0

  point_results = [tmp_path / r['point'] / 'results.json' for r in rows]
  mtimes = [p.stat().st_mtime_ns for p in point_results]
  monkeypatch.setattr(train_lib, 'train_and_evaluate', _no_training)
  again = sweeps.run_sweep(sweep, sweeps.build_points(sweep, workdir), workdir)
  assert again == rows
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == (
    f'[1/2] model.halo_size=0: finished earlier, skipped (test top-1 {rows[0]["top1_test"]:.2f}%)'
  )
  assert [p.stat().st_mtime_ns for p in point_results] == mtimes


def test_seeds_train_each_point_per_seed_and_report_mean_and_spread(tmp_path):
  workdir = str(tmp_path)
  sweep = _tiny_sweep(points=({'model.halo_size': 1},), seeds=(0, 1))
  points = sweeps.build_points(sweep, workdir)
  assert [p.name for p in points] == ['model.halo_size=1,seed=0', 'model.halo_size=1,seed=1']
  assert [p.config.seed for p in points] == [0, 1]
  (row,) = sweeps.run_sweep(sweep, points, workdir)
  runs = [
    json.loads((tmp_path / p.name / 'results.json').read_text())['raw_eval']['test']['top1']
    for p in points
  ]
  assert row['point'] == 'model.halo_size=1' and row['seeds'] == 2
  assert row['top1_test'] == pytest.approx(sum(runs) / 2, abs=0.01)
  assert row['top1_test_std'] == pytest.approx(abs(runs[0] - runs[1]) / 2**0.5, abs=0.01)
  with open(tmp_path / 'results.json') as f:
    stored = json.load(f)
  assert stored['seeds'] == [0, 1] and len(stored['runs']) == 2
  assert (tmp_path / 'results.png').stat().st_size > 0
