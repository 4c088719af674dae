"""Workdirs in a bucket: every command, against a real Cloud Storage API served on 127.0.0.1.

The `storage_server` fixture (conftest.py) starts the server and points gcsfs and TensorStore at
it; train.py, eval.py, predict.py and sweep.py run as subprocesses with `gs://` paths. A run
that resolved a URL as a local path would leave a `gs:` folder in its working directory: every
test checks that none appeared.
"""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import tiny
from halonet import paths
from halonet import sharding
from halonet.train import checkpointing
from halonet.train import evaluation as eval_lib
from halonet.train import loop as train_lib
from halonet.train import workdir as workdir_lib
from tests import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERRUPTED_TRAIN = os.path.join(REPO, 'tests', 'scripts', 'interrupted_train.py')
STEPS = 6
FLAGS = [
  f'--config={REPO}/configs/tiny.py',
  f'--config.num_train_steps={STEPS}',
  '--config.checkpoint_every_steps=1',
]
TIMEOUT_S = load.timeout(300)


def _run(script, *args, cwd):
  return subprocess.run(
    [sys.executable, os.path.join(REPO, script), *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def _objects(url):
  """{relative name: bytes} of every object under `url`."""
  return {name[len(url) + 1 :]: paths.path(name).read_bytes() for name in paths.files_under(url)}


def _final_state(workdir):
  manager = checkpointing.create_manager(workdir, 3, read_only=True)
  try:
    assert manager.latest_step() == STEPS
    return jax.device_get(manager.restore(STEPS, args=ocp.args.StandardRestore()))
  finally:
    manager.close()


def _no_local_gs_folder(*folders):
  for folder in folders:
    assert not os.path.exists(os.path.join(folder, 'gs:')), folder


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_exactly_evaluates_predicts_and_fine_tunes(
  storage_server, tmp_path
):
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps = STEPS, 1
  local = str(tmp_path / 'local')
  train_lib.train_and_evaluate(config, local)

  # SIGKILL just before step 4's batch is read, with a save started every step: saves may be
  # in flight. The rerun resumes from the newest complete step and ends where `local` ended.
  run = f'{storage_server}/runs/tiny'
  kill = subprocess.run(
    [
      sys.executable,
      INTERRUPTED_TRAIN,
      'SIGKILL',
      str(4 + sharding.PREFETCH_BATCHES),
      '-',
      '0',
      f'--workdir={run}',
      *FLAGS,
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert kill.returncode == -signal.SIGKILL, kill.stderr[-3000:]
  complete = checkpointing.create_manager(run, 3, read_only=True)
  resumed_at = complete.latest_step()
  complete.close()
  assert resumed_at is not None and resumed_at < STEPS
  done = _run('train.py', f'--workdir={run}', *FLAGS, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'resumed from checkpoint at step {resumed_at}' in done.stdout
  jax.tree.map(np.testing.assert_array_equal, _final_state(run), _final_state(local))
  objects = _objects(run)
  assert paths.read_json(f'{run}/results.json')['step'] == STEPS
  assert 'config.json' in objects
  # TensorBoard reads the events written as whole objects: every step, those before the kill
  # (flushed with each checkpoint) and those after the resume.
  events = tmp_path / 'events'
  events.mkdir()
  for name, data in objects.items():
    if name.startswith('events.out.tfevents'):
      (events / name).write_bytes(data)
  accumulator = event_accumulator.EventAccumulator(str(events))
  accumulator.Reload()
  assert sorted({e.step for e in accumulator.Scalars('train/loss')}) == list(range(1, STEPS + 1))

  # A resume that cannot restore (another model) stops in one line, suggesting no flag that
  # cannot help, and changes nothing in the bucket.
  refused = _run(
    'train.py',
    f'--workdir={run}',
    *FLAGS,
    '--config.model.widths=(8,16,16,24)',
    '--allow_config_change',
    cwd=tmp_path,
  )
  assert refused.returncode != 0
  last = refused.stderr.strip().splitlines()[-1]
  assert 'stage4_block0' in last and '24' in last and 'has shape' in last, last
  assert '--allow_config_change' not in last and 'Traceback' not in refused.stderr
  assert _objects(run) == objects

  # eval.py from the stored config, then again here: the second record is added after the
  # first, on a store that cannot append.
  evaluated = _run('eval.py', f'--workdir={run}', cwd=tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  eval_lib.evaluate_checkpoint(workdir_lib.load_config(run), run)
  records = paths.read_json_lines(f'{run}/eval_records.jsonl')
  assert len(records) == 2 and records[0]['top1'] == records[1]['top1']
  assert records[0]['step'] == STEPS

  image = tmp_path / 'digit.png'
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(image)
  predicted = _run('predict.py', f'--workdir={run}', str(image), cwd=tmp_path)
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  predictions = paths.read_json(f'{run}/predictions.json')
  assert predictions['step'] == STEPS and len(predictions['predictions']) == 1

  tuned = f'{storage_server}/runs/tuned'
  fine_tune = _run(
    'train.py',
    f'--workdir={tuned}',
    f'--config={REPO}/configs/tiny.py',
    '--config.num_train_steps=2',
    f'--config.init_from={run}',
    cwd=tmp_path,
  )
  assert fine_tune.returncode == 0, fine_tune.stderr[-3000:]
  assert f'initialised from {run} step {STEPS}' in fine_tune.stdout
  assert paths.read_json(f'{tuned}/results.json')['step'] == 2
  _no_local_gs_folder(tmp_path, REPO)


@pytest.mark.slow
def test_a_sweep_in_a_bucket_writes_its_table_and_plot_there(storage_server, tmp_path):
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(
    'import ml_collections\n\n\ndef get_config():\n'
    "  return ml_collections.ConfigDict({'base': 'configs/tiny.py', 'base_overrides': "
    "{'num_train_steps': 2}, 'grid': {'model': {'halo_size': (0,)}}})\n"
  )
  workdir = f'{storage_server}/sweeps/halo'
  swept = subprocess.run(
    [sys.executable, 'sweep.py', f'--sweep={sweep_file}', f'--workdir={workdir}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert swept.returncode == 0, swept.stderr[-3000:]
  objects = _objects(workdir)
  for name in (
    'results.json',
    'results.csv',
    'results.png',
    'model.halo_size=0/results.json',
    'model.halo_size=0/config.json',
  ):
    assert name in objects, sorted(objects)
  assert objects['results.png'].startswith(b'\x89PNG')
  assert len(paths.read_json(f'{workdir}/results.json')['rows']) == 1
  _no_local_gs_folder(tmp_path, REPO)


def test_a_missing_bucket_fails_in_one_line_before_anything_compiles(storage_server, tmp_path):
  run = _run(
    'train.py',
    '--workdir=gs://no-such-bucket/run',
    f'--config={REPO}/configs/tiny.py',
    cwd=tmp_path,
  )
  assert run.returncode != 0
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith('FATAL workdir gs://no-such-bucket/run cannot be written'), last
  assert 'Traceback' not in run.stderr and 'compiled' not in run.stdout
  _no_local_gs_folder(tmp_path)
