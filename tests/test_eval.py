"""eval.py reproduces the training run's final evaluation from the checkpoint alone."""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from halonet import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_eval_py_matches_training_run(tmp_path):
  config = tiny.get_config()
  config.num_train_steps = 6
  config.ema_decay = 0.5
  workdir = str(tmp_path)
  trained = train_lib.train_and_evaluate(config, workdir)
  assert json.loads((tmp_path / 'results.json').read_text()) == json.loads(json.dumps(trained))

  flags = ['--config=configs/tiny.py', '--config.num_train_steps=6', '--config.ema_decay=0.5',
           f'--workdir={workdir}']
  run = subprocess.run([sys.executable, 'eval.py', *flags], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'step 6 test (raw params): top-1' in run.stdout
  # An earlier step, in process: its figures go under their own key beside step 6's.
  train_lib.evaluate_checkpoint(config, workdir, step=4)
  results = json.loads((tmp_path / 'eval_results.json').read_text())
  assert sorted(results) == ['4', '6']
  for name in ('raw_eval', 'ema_eval'):
    evaluated, final = results['6'][name]['test'], trained[name]['test']
    assert evaluated['count'] == final['count'] == 360  # Each test image exactly once.
    for key in ('top1', 'top5'):
      assert evaluated[key] == final[key]
    assert evaluated['loss'] == pytest.approx(final['loss'], rel=1e-6)


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path):
  # One CPU device, as a user runs it: not the 8 fake devices conftest gives this process.
  env = dict(os.environ, XLA_FLAGS='')
  run = subprocess.run([sys.executable, 'train.py', '--config=configs/quickstart.py',
                        f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'final test accuracy (raw params' in run.stdout
  results = json.loads((tmp_path / 'results.json').read_text())
  # 60 epochs of full batches: the digits' train split is 1797 - 360 = 1437 images, 22 x 64.
  assert results['step'] == 60 * (1437 // 64)
  assert results['raw_eval']['test']['top1'] >= 95.0, results
