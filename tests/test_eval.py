"""eval.py reproduces the training run's final evaluation from the checkpoint alone."""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from halonet import eval_lib
from halonet import paths
from halonet import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_py_matches_training_run_and_appends_records(tmp_path):
  config = tiny.get_config()
  config.num_train_steps = 6
  config.ema_decay = 0.5
  workdir = str(tmp_path)
  trained = train_lib.train_and_evaluate(config, workdir)
  assert json.loads((tmp_path / 'results.json').read_text()) == json.loads(json.dumps(trained))

  # No --config: the run's own stored config (6 steps, EMA 0.5) is evaluated.
  run = subprocess.run(
    [sys.executable, 'eval.py', f'--workdir={workdir}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'step 6 digits test (ema params): top-1' in run.stdout
  records_path = tmp_path / 'eval_records.jsonl'
  first = records_path.read_text()
  # An earlier step and another split, in process: appended beside step 6's, which stay as they
  # were (records are never replaced, whatever their keys).
  eval_lib.evaluate_checkpoint(config, workdir, step=4)
  config.eval_splits = ('train',)
  eval_lib.evaluate_checkpoint(config, workdir, step=6)
  assert records_path.read_text().startswith(first)
  records = paths.read_json_lines(str(records_path))
  assert [(r['step'], r['dataset'], r['split'], r['weights']) for r in records] == [
    (6, 'digits', 'test', 'raw'),
    (6, 'digits', 'test', 'ema'),
    (4, 'digits', 'test', 'raw'),
    (4, 'digits', 'test', 'ema'),
    (6, 'digits', 'train', 'raw'),
    (6, 'digits', 'train', 'ema'),
  ]
  for evaluated in records[:2]:
    final = trained[f'{evaluated["weights"]}_eval']['test']
    assert evaluated['count'] == final['count'] == 360  # Each test image exactly once.
    for key in ('top1', 'top5'):
      assert evaluated[key] == final[key]
    assert evaluated['loss'] == pytest.approx(final['loss'], rel=1e-6)
  assert records[-1]['count'] == 1437


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path):
  # One CPU device, as a user runs it: not the 8 fake devices conftest gives this process.
  env = dict(os.environ, XLA_FLAGS='')
  run = subprocess.run(
    [sys.executable, 'train.py', '--config=configs/quickstart.py', f'--workdir={tmp_path}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'final test accuracy (raw params' in run.stdout
  results = json.loads((tmp_path / 'results.json').read_text())
  # 60 epochs of full batches: the digits' train split is 1797 - 360 = 1437 images, 22 x 64.
  assert results['step'] == 60 * (1437 // 64)
  assert results['raw_eval']['test']['top1'] >= 95.0, results
