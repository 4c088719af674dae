"""A damaged checkpoint (a file of its newest step truncated, missing or overwritten with garbage,
its metadata garbled, or on a bucket its commit marker missing) is stepped over, named in one
line, and never deleted: a run moves it aside and resumes from the newest step that reads whole;
a reader (eval.py, predict.py, a fine-tune's source) leaves the files alone; a step asked for by
number fails in one line. Locally and on the Cloud Storage API server on 127.0.0.1."""

import os

import jax
import numpy as np
import pytest

from configs import tiny
from halonet import errors
from halonet import paths
from halonet.train import checkpointing
from halonet.train import loop as train_lib
from halonet.train import workdir as workdir_lib

STEPS = (2, 4, 6)


def _state(step: int) -> dict:
  return {'params': {'w': np.arange(300, dtype=np.float32) + step}, 'step': np.int32(step)}


def _abstract() -> dict:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), _state(0))


def _saved(workdir: str) -> None:
  manager = checkpointing.create_manager(workdir, 10)
  for step in STEPS:
    checkpointing.save(manager, step, _state(step))
  checkpointing.finish(manager)


def _array_files(step_dir: str) -> list[str]:
  """The files holding the arrays' bytes (the OCDBT data files of the step's item)."""
  return [f for f in paths.files_under(step_dir) if '/d/' in f]


def _damage(step_dir: str, how: str) -> None:
  if how == 'metadata':
    paths.write_bytes(paths.path(step_dir) / 'default' / '_METADATA', b'{"tree_metadata": ')
    return
  for name in _array_files(step_dir):
    data = paths.path(name).read_bytes()
    if how == 'truncated':
      paths.write_bytes(name, data[: len(data) // 2])
    elif how == 'missing':
      paths.path(name).unlink()
    elif how == 'garbage':
      paths.write_bytes(name, bytes(range(256)) * (len(data) // 256 + 1))


DAMAGE = ('truncated', 'missing', 'garbage', 'metadata')


@pytest.fixture(params=['local', 'bucket'])
def workdir(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'run')
  server = request.getfixturevalue('storage_server')
  return f'{server}/damaged/{request.node.name.replace("[", "_").replace("]", "")}'


@pytest.mark.parametrize('how', DAMAGE)
def test_a_run_moves_a_damaged_newest_step_aside_and_resumes_from_the_one_before(workdir, how):
  _saved(workdir)
  checkpoints = paths.path(workdir) / 'checkpoints'
  _damage(str(checkpoints / '6'), how)
  files_before = sorted(
    paths.as_string(f)[len(paths.as_string(checkpoints / '6')) :]
    for f in paths.files_under(checkpoints / '6')
  )
  lines = []
  manager = checkpointing.create_manager(workdir, 10)
  step, state = checkpointing.restore_readable(
    manager, _abstract(), set_aside_damaged=True, say=lines.append
  )
  assert step == 4 and int(state['step']) == 4
  np.testing.assert_array_equal(state['params']['w'], _state(4)['params']['w'])
  assert len(lines) == 1 and lines[0].startswith(f'checkpoint step 6 in {checkpoints}')
  assert f'moved to {checkpoints}/6.damaged; trying the step before it' in lines[0]
  # Nothing deleted: every file of the step is under its new name, and no step 6 is left.
  aside = checkpoints / '6.damaged'
  assert (
    sorted(paths.as_string(f)[len(paths.as_string(aside)) :] for f in paths.files_under(aside))
    == files_before
  )
  assert sorted(manager.all_steps()) == [2, 4]
  checkpointing.save(manager, 8, _state(8))  # The next save keeps the damaged step too.
  checkpointing.finish(manager)
  assert (checkpoints / '6.damaged').exists() and (checkpoints / '8').exists()


@pytest.mark.parametrize('how', ['truncated', 'metadata'])
def test_a_reader_steps_over_a_damaged_step_without_touching_it(workdir, how):
  _saved(workdir)
  checkpoints = paths.path(workdir) / 'checkpoints'
  _damage(str(checkpoints / '6'), how)
  reader = checkpointing.create_manager(workdir, 10, read_only=True)
  lines = []
  step, _ = checkpointing.restore_readable(reader, _abstract(), say=lines.append)
  assert step == 4 and len(lines) == 1 and 'cannot be read' in lines[0]
  assert 'moved' not in lines[0] and (checkpoints / '6').exists()
  with pytest.raises(
    errors.ConfigError, match=f'checkpoint step 6 in {checkpoints} cannot be read'
  ):
    checkpointing.restore_readable(reader, _abstract(), 6)
  reader.close()


def test_a_run_whose_every_step_is_damaged_says_each_and_starts_at_0(tmp_path):
  workdir = str(tmp_path / 'run')
  _saved(workdir)
  checkpoints = paths.path(workdir) / 'checkpoints'
  for step, how in zip(STEPS, ('missing', 'metadata', 'truncated')):
    _damage(str(checkpoints / str(step)), how)
  reader = checkpointing.create_manager(workdir, 10, read_only=True)
  with pytest.raises(FileNotFoundError) as raised:
    checkpointing.restore_readable(reader, _abstract(), say=lambda line: None)
  assert (
    str(raised.value) == f'no readable checkpoint in {checkpoints} (steps [2, 4, 6] are damaged)'
  )
  reader.close()
  lines = []
  manager = checkpointing.create_manager(workdir, 10)
  assert checkpointing.resume(manager, _abstract(), workdir, advice='-', say=lines.append) == (
    0,
    None,
  )
  assert [line.split(' in ')[0] for line in lines] == [
    'checkpoint step 6',
    'checkpoint step 4',
    'checkpoint step 2',
    'no checkpoint',
  ]
  assert all('moved to' in line for line in lines[:3])
  assert lines[3] == f'no checkpoint in {workdir} could be read: starting at step 0'
  assert sorted(os.listdir(checkpoints)) == ['2.damaged', '4.damaged', '6.damaged']
  checkpointing.finish(manager)


def test_a_step_without_its_commit_marker_on_a_bucket_is_never_restored(storage_server):
  workdir = f'{storage_server}/damaged/uncommitted'
  _saved(workdir)
  (paths.path(workdir) / 'checkpoints' / '6' / 'commit_success.txt').unlink()
  reader = checkpointing.create_manager(workdir, 10, read_only=True)
  assert sorted(reader.all_steps()) == [2, 4]
  assert checkpointing.restore_readable(reader, _abstract())[0] == 4
  reader.close()


def test_training_resumes_past_a_damaged_newest_checkpoint(tmp_path, capsys):
  """The run itself: step 4 of 2, 4 is truncated; the rerun names it, moves it aside, resumes at
  step 2 and finishes; eval.py's path (a reader) then reads the run's newest step."""
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps = 4, 2
  workdir = tmp_path / 'run'
  train_lib.train_and_evaluate(config, str(workdir))
  _damage(str(workdir / 'checkpoints' / '4'), 'truncated')
  os.remove(workdir / workdir_lib.RESULTS)  # As a run killed before its final evaluation.
  capsys.readouterr()
  assert train_lib.train_and_evaluate(config, str(workdir))['step'] == 4
  out = capsys.readouterr().out
  assert f'checkpoint step 4 in {workdir}/checkpoints cannot be read' in out
  assert 'resumed from checkpoint at step 2' in out
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '4.damaged']


def test_a_garbled_config_json_is_named_in_one_line(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  garbled = '{"model": {"block_size": 8,'
  (workdir / workdir_lib.CONFIG).write_text(garbled)
  with pytest.raises(errors.ConfigError, match=f'{workdir}/config.json cannot be read'):
    train_lib.train_and_evaluate(tiny.get_config(), str(workdir))
  assert (workdir / workdir_lib.CONFIG).read_text() == garbled  # Left as it was.
  assert sorted(os.listdir(workdir)) == [workdir_lib.CONFIG]
