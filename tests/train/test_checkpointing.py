"""Orbax checkpoints (halonet/train/checkpointing.py) on a local folder, with small hand-made
states: which steps are kept and restored, why a state cannot restore (from shapes alone), what a
full disk reports, and which Orbax log lines are kept."""

import errno
import logging
import sys
import threading
import types
import uuid

import jax
import numpy as np
from orbax.checkpoint._src.serialization import replica_slices
import pytest

from halonet import errors
from halonet import paths
from halonet import storage
from halonet.train import checkpointing


def _state(step: int, width: int = 3) -> dict:
  return {'params': {'w': np.full(width, step, np.float32)}, 'step': np.int32(step)}


def _abstract(state: dict):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), state)


def _saved(workdir, steps, keep=3) -> None:
  manager = checkpointing.create_manager(str(workdir), keep)
  for step in steps:
    checkpointing.save(manager, step, _state(step))
  checkpointing.finish(manager)


def test_the_last_keep_steps_are_kept_and_the_latest_restores_by_default(tmp_path):
  _saved(tmp_path, (1, 2, 3), keep=2)
  manager = checkpointing.create_manager(str(tmp_path), 2, read_only=True)
  assert sorted(manager.all_steps()) == [2, 3]
  latest = checkpointing.restore_readable(manager, _abstract(_state(0)))[1]
  earlier = checkpointing.restore_readable(manager, _abstract(_state(0)), step=2)[1]
  np.testing.assert_array_equal(latest['params']['w'], np.full(3, 3.0))
  assert int(earlier['step']) == 2


def test_a_step_not_kept_or_an_empty_workdir_is_named(tmp_path):
  _saved(tmp_path / 'run', (1, 2, 3), keep=2)
  manager = checkpointing.create_manager(str(tmp_path / 'run'), 2, read_only=True)
  with pytest.raises(FileNotFoundError, match=r'step=1 in .*checkpoints; have \[2, 3\]'):
    checkpointing.restore_readable(manager, _abstract(_state(0)), step=1)[1]
  empty = checkpointing.create_manager(str(tmp_path / 'empty'), 2, read_only=True)
  with pytest.raises(FileNotFoundError, match=r'no complete checkpoint in .*empty/checkpoints$'):
    checkpointing.restore_readable(empty, _abstract(_state(0)))[1]
  assert not (tmp_path / 'empty').exists()  # A reader creates nothing.


def test_shape_mismatch_names_the_first_array_that_cannot_restore(tmp_path):
  _saved(tmp_path, (4,))
  manager = checkpointing.create_manager(str(tmp_path), 3, read_only=True)
  assert checkpointing.shape_mismatch(manager, 4, _abstract(_state(0))) is None
  wider = _abstract(_state(0, width=5))
  assert checkpointing.shape_mismatch(manager, 4, wider) == (
    'params/w has shape (3,) in the checkpoint but (5,) in this config'
  )
  with pytest.raises(checkpointing.ShapeMismatch) as raised:
    checkpointing.restore_readable(manager, wider)
  assert (
    str(raised.value) == 'step 4: params/w has shape (3,) in the checkpoint but (5,) in this config'
  )
  extra = _abstract({**_state(0), 'ema': {'w': np.zeros(3, np.float32)}})
  assert checkpointing.shape_mismatch(manager, 4, extra) == (
    "ema/w (3,) is in this config's state but not in the checkpoint"
  )
  fewer = _abstract({'params': _state(0)['params']})
  assert checkpointing.shape_mismatch(manager, 4, fewer) == (
    "step () is in the checkpoint but not in this config's state"
  )


@pytest.mark.parametrize(
  'error', [OSError(errno.ENOSPC, 'full'), ValueError('write: No space left on device')]
)
def test_a_full_disk_names_the_last_complete_checkpoint(tmp_path, monkeypatch, error):
  manager = checkpointing.create_manager(str(tmp_path), 3)
  checkpointing.save(manager, 2, _state(2))
  manager.wait_until_finished()

  def full(*args, **kwargs):
    raise error

  monkeypatch.setattr(manager, 'save', full)
  with pytest.raises(errors.DiskFull, match=r'the last complete checkpoint is step 2: free space'):
    checkpointing.save(manager, 3, _state(3))
  monkeypatch.undo()
  manager.close()


def test_other_save_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
  manager = checkpointing.create_manager(str(tmp_path), 3)

  def broken(*args, **kwargs):
    raise ValueError('bad tree')

  monkeypatch.setattr(manager, 'save', broken)
  with pytest.raises(ValueError, match='bad tree'):
    checkpointing.save(manager, 1, _state(1))
  manager.close()


def _record(pathname: str, level: int, message: str) -> logging.LogRecord:
  return logging.LogRecord('absl', level, pathname, 1, message, None, None)


def test_only_orbax_info_lines_and_read_only_notices_are_dropped():
  orbax = '/site-packages/orbax/checkpoint/manager.py'
  notice = checkpointing._not_read_only_notice  # pylint: disable=protected-access
  assert not notice(_record(orbax, logging.WARNING, 'manager is read only: no save'))
  assert not notice(_record(orbax, logging.WARNING, 'created with read_only=True'))
  assert notice(_record(orbax, logging.WARNING, 'step 3 is incomplete'))
  assert notice(_record('/halonet/train/loop.py', logging.WARNING, 'read only'))


def test_orbax_info_lines_are_dropped_and_its_warnings_kept():
  from absl import logging as absl_logging

  checkpointing.quiet_orbax()
  handler = absl_logging.get_absl_handler()
  orbax = '/site-packages/orbax/checkpoint/manager.py'
  assert not handler.filter(_record(orbax, logging.INFO, 'saving step 3'))
  assert handler.filter(_record(orbax, logging.WARNING, 'step 3 is incomplete'))
  assert handler.filter(_record('/halonet/train/loop.py', logging.INFO, 'step 3'))


def test_a_full_disk_is_dropped_from_orbax_and_asyncio_logs_and_other_errors_kept():
  """DiskFull reports a full disk in one line; the same error from each of Orbax's writer threads
  and their unawaited tasks is noise, any other error of theirs is not."""
  worth_showing = checkpointing._worth_showing  # pylint: disable=protected-access
  orbax = '/site-packages/orbax/checkpoint/_src/futures/future.py'
  full = 'RESOURCE_EXHAUSTED: Failed to write 31 bytes: No space left on device'
  assert not worth_showing(_record(orbax, logging.ERROR, f'thread raised: {full}'))
  try:
    try:
      raise ValueError(full)
    except ValueError as e:
      raise RuntimeError('Save Finalize thread failed') from e
  except RuntimeError:
    record = _record(orbax, logging.ERROR, 'Save Finalize thread failed')
    record.exc_info = sys.exc_info()
  assert not worth_showing(record)
  unawaited = _record('/lib/asyncio/base_events.py', logging.ERROR, f'never retrieved: {full}')
  unawaited.name = 'asyncio'
  assert not worth_showing(unawaited)
  assert worth_showing(_record(orbax, logging.ERROR, 'PERMISSION_DENIED: cannot write'))
  unawaited.msg = 'Task exception was never retrieved: KeyError'
  assert worth_showing(unawaited)
  assert worth_showing(_record('/tensorboard/writer.py', logging.ERROR, full))


def _from(name: str, level: int, message: str) -> logging.LogRecord:
  record = _record(f'/site-packages/{name}/core.py', level, message)
  record.name = name
  return record


def test_an_unreachable_store_is_dropped_from_the_storage_libraries_logs_and_only_orbax_info():
  """halonet/storage.py names an outage in one line; gcsfs logs each retried request, fsspec each
  prefetched read, Orbax and asyncio each failed write. Their other lines stay, and only Orbax's
  INFO lines go."""
  worth_showing = checkpointing._worth_showing  # pylint: disable=protected-access
  orbax = '/site-packages/orbax/checkpoint/_src/futures/future.py'
  down = 'UNAVAILABLE: HTTP response code: 503 writing checkpoints/3/_METADATA'
  assert not worth_showing(_record(orbax, logging.ERROR, f'thread raised: {down}'))
  assert not worth_showing(_from('gcsfs', logging.WARNING, f'retrying request: {down}'))
  assert not worth_showing(_from('asyncio', logging.ERROR, f'never retrieved: {down}'))
  # fsspec's prefetcher logs a failed read as logger.exception('Consumer caught an error.').
  for error, shown in (
    (ConnectionRefusedError(111, 'Connect call failed'), False),
    (KeyError(3), True),
  ):
    try:
      raise error
    except type(error):
      prefetch = _from('fsspec.prefetcher', logging.ERROR, 'Consumer caught an error.')
      prefetch.exc_info = sys.exc_info()
    assert worth_showing(prefetch) == shown, error
  assert worth_showing(_from('gcsfs', logging.WARNING, 'bucket type unknown: a flat bucket'))
  assert worth_showing(_from('gcsfs', logging.INFO, 'listing gs://b'))
  assert worth_showing(_from('asyncio', logging.INFO, 'Using selector: EpollSelector'))


def test_only_callbacks_to_a_closed_event_loop_are_kept_from_the_unraisable_hook(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda info: seen.append(info.exc_value))
  checkpointing.quiet_orbax()
  hook = sys.unraisablehook
  checkpointing.quiet_orbax()
  assert sys.unraisablehook is hook  # Twice wraps once.
  closed, other = RuntimeError('Event loop is closed'), RuntimeError('the stream broke')
  same_text = ValueError('Event loop is closed')
  for error in (closed, other, same_text):
    sys.unraisablehook(types.SimpleNamespace(exc_value=error))
  assert seen == [other, same_text]


def test_a_writer_removes_unfinished_saves_and_a_reader_leaves_them(tmp_path):
  """A run's leftovers from a crash mid-save go before its first save; an eval reading a live
  run must not touch the save in progress."""
  for name in ('reader', 'writer'):
    (tmp_path / name / 'checkpoints' / '7.orbax-checkpoint-tmp-1').mkdir(parents=True)
  reader = checkpointing.create_manager(str(tmp_path / 'reader'), 3, read_only=True)
  assert list(reader.all_steps()) == []
  reader.close()
  _saved(tmp_path / 'writer', (1,))
  assert sorted(p.name for p in (tmp_path / 'reader' / 'checkpoints').iterdir()) == [
    '7.orbax-checkpoint-tmp-1'
  ]
  assert sorted(p.name for p in (tmp_path / 'writer' / 'checkpoints').iterdir()) == ['1']


def test_a_reader_silences_orbax_notices_that_it_will_not_write(tmp_path):
  checkpointing.create_manager(str(tmp_path), 3, read_only=True).close()
  notice = checkpointing._not_read_only_notice  # pylint: disable=protected-access
  assert notice in logging.getLogger('absl').filters


def test_restore_places_arrays_as_the_abstract_state_says(tmp_path):
  _saved(tmp_path, (2,))
  device = jax.devices()[-1]
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
    ),
    _abstract(_state(0)),
  )
  manager = checkpointing.create_manager(str(tmp_path), 3, read_only=True)
  restored = checkpointing.restore_readable(manager, abstract)[1]
  assert restored['params']['w'].devices() == {device}


def test_resume_starts_a_fresh_run_at_0_and_a_step_0_checkpoint_from_itself(tmp_path):
  said = []
  empty = checkpointing.create_manager(str(tmp_path / 'empty'), 3)
  assert checkpointing.resume(empty, _abstract(_state(0)), 'W', advice='-', say=said.append) == (
    0,
    None,
  )
  _saved(tmp_path / 'converted', (0,))
  manager = checkpointing.create_manager(str(tmp_path / 'converted'), 3)
  step, state = checkpointing.resume(
    manager, _abstract(_state(9)), 'W', advice='-', say=said.append
  )
  assert step == 0 and state is not None and int(state['step']) == 0
  _saved(tmp_path / 'run', (2, 4))
  manager = checkpointing.create_manager(str(tmp_path / 'run'), 3)
  step, state = checkpointing.resume(
    manager, _abstract(_state(0)), 'W', advice='-', say=said.append
  )
  assert step == 4 and int(state['step']) == 4
  assert said == []


def test_resume_into_other_shapes_is_one_line_ending_with_the_advice(tmp_path):
  _saved(tmp_path, (4,))
  manager = checkpointing.create_manager(str(tmp_path), 3)
  closed, close = [], manager.close
  manager.close = lambda: (closed.append(True), close())
  with pytest.raises(errors.ConfigError) as raised:
    checkpointing.resume(manager, _abstract(_state(0, width=5)), str(tmp_path), advice='do this')
  assert str(raised.value) == (
    f'cannot resume {tmp_path} from step 4 with this config: '
    'params/w has shape (3,) in the checkpoint but (5,) in this config; do this'
  )
  assert closed == [True]  # The run stops here: its manager's threads end with it.


def test_resume_with_no_readable_checkpoint_says_so_and_starts_at_0(tmp_path, monkeypatch):
  _saved(tmp_path, (4,))
  manager = checkpointing.create_manager(str(tmp_path), 3)

  def unreadable(*args, **kwargs):
    raise FileNotFoundError('every step is damaged')

  monkeypatch.setattr(checkpointing, 'restore_readable', unreadable)
  said = []
  resumed = checkpointing.resume(
    manager, _abstract(_state(0)), str(tmp_path), advice='-', say=said.append
  )
  assert resumed == (0, None)
  assert said == [f'no checkpoint in {tmp_path} could be read: starting at step 0']


def test_an_outage_names_the_last_committed_step_and_other_errors_pass_unchanged(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), 3)
  with pytest.raises(errors.StorageOutage, match=r'^down; the last committed checkpoint is none:'):
    with checkpointing.naming_last_commit(manager):
      raise errors.StorageOutage('down')
  checkpointing.save(manager, 2, _state(2))
  checkpointing.wait_saved(manager, 2, _state(2))
  with pytest.raises(errors.StorageOutage) as raised:
    with checkpointing.naming_last_commit(manager):
      raise errors.StorageOutage('down')
  assert str(raised.value) == (
    'down; the last committed checkpoint is step 2: '
    'rerun the same command once the store is back to resume from it'
  )
  with pytest.raises(ValueError, match='^other$'):
    with checkpointing.naming_last_commit(manager):
      raise ValueError('other')
  checkpointing.finish(manager)


# TensorStore's failure to write to a store out of reach, as Orbax re-raises it.
UNAVAILABLE = 'UNAVAILABLE: Error writing "checkpoints/2/_METADATA": HTTP response code: 503'


class _FailingInTheBackground:
  """Saves of `steps` fail as a background write fails (by default, to an object store in an
  outage): `save` returns and nothing is written; the next wait (Orbax's own save waits first)
  raises `error`, once. Other saves and waits are the manager's own."""

  def __init__(self, manager, steps, error=None):
    self.save, self.wait = manager.save, manager.wait_until_finished
    self.steps, self.error, self.failure = set(steps), error or ValueError(UNAVAILABLE), None
    manager.save, manager.wait_until_finished = self._save, self._wait

  def _save(self, step, **kwargs):
    if step not in self.steps:
      return self.save(step, **kwargs)
    self.steps.discard(step)
    self._wait()
    self.failure = self.error
    return True

  def _wait(self):
    self.wait()
    failure, self.failure = self.failure, None
    if failure:
      raise failure


def _read_back(workdir):
  reader = checkpointing.create_manager(workdir, 5, read_only=True)
  steps = sorted(reader.all_steps())
  return steps, {s: checkpointing.restore_readable(reader, _abstract(_state(0)), s) for s in steps}


def test_on_a_store_a_step_counts_as_committed_only_once_its_save_is_known_complete(
  storage_server, storage_clock, caplog
):
  """A save that failed in the background is retried with the next step's state and never
  counted as committed; a run's last save that failed is saved again before the run ends."""
  workdir = f'{storage_server}/saves_{uuid.uuid4().hex}'
  manager = checkpointing.create_manager(workdir, 5)
  _FailingInTheBackground(manager, steps={2, 4})
  assert checkpointing.committed_step(manager) is None
  checkpointing.save(manager, 1, _state(1))
  assert checkpointing.committed_step(manager) is None  # Still saving in the background.
  checkpointing.save(manager, 2, _state(2))
  assert checkpointing.committed_step(manager) == 1  # Orbax waited for it before starting 2.
  with caplog.at_level(logging.WARNING):
    checkpointing.save(manager, 3, _state(3))  # Meets step 2's failure, then saves 3.
  assert checkpointing.committed_step(manager) == 1
  assert [r.getMessage() for r in caplog.records if r.name == 'absl'] == [
    f'storage {storage_server} unreachable while saving checkpoint step 3 in '
    f'{workdir}/checkpoints ({UNAVAILABLE}): retrying for up to 100 s',
    f'storage {storage_server} reachable again after 1 s; saving checkpoint step 3 in '
    f'{workdir}/checkpoints done',
  ]
  checkpointing.save(manager, 4, _state(4))
  assert checkpointing.committed_step(manager) == 3
  checkpointing.wait_saved(manager, 4, _state(4))  # Step 4 failed: saved again, then waited.
  assert checkpointing.committed_step(manager) == 4
  checkpointing.save(manager, 5, _state(5))
  assert checkpointing.committed_step(manager) == 4  # Not forgotten while 5 is being saved.
  checkpointing.wait_saved(manager, 5, _state(5))
  checkpointing.finish(manager)
  steps, restored = _read_back(workdir)
  assert steps == [1, 3, 4, 5]
  for step in steps:
    assert restored[step][0] == step
    np.testing.assert_array_equal(restored[step][1]['params']['w'], np.full(3, step))


def test_a_long_wait_for_a_save_probes_the_store_and_an_outage_past_the_budget_ends_it(
  storage_server, storage_clock, monkeypatch
):
  """TensorStore retries a write for minutes without a word: the wait asks the store itself,
  waits on while it answers, and stops at the outage budget, its waiting thread left behind."""
  workdir = f'{storage_server}/probes_{uuid.uuid4().hex}'
  manager = checkpointing.create_manager(workdir, 3)
  checkpointing.save(manager, 1, _state(1))
  wait, finished = manager.wait_until_finished, threading.Event()
  threading.Timer(60, finished.set).start()  # Bounds the test whatever the code under it does.
  manager.wait_until_finished = lambda: (finished.wait(), wait())
  monkeypatch.setattr(checkpointing, 'PROBE_EVERY_S', 0.01)
  gpath, probes, reachable = type(paths.path(workdir)), [], [True]
  exists = gpath.exists

  def probed(path):
    """The store as the waiting (main) thread sees it; Orbax's own threads see it unchanged."""
    if threading.current_thread() is not threading.main_thread():
      return exists(path)
    probes.append(paths.as_string(path))
    if not reachable[0]:
      raise ConnectionRefusedError('Cannot connect to host 127.0.0.1')
    if len(probes) == 3:
      finished.set()  # The save completes while the store answers.
    return exists(path)

  monkeypatch.setattr(gpath, 'exists', probed)
  checkpointing.wait_saved(manager, 1, _state(1))
  assert len(probes) >= 3 and set(probes) == {f'{workdir}/checkpoints'}
  assert checkpointing.committed_step(manager) == 1

  checkpointing.save(manager, 2, _state(2))
  reachable[0] = False
  waiting_callers = {
    'the next save': lambda: checkpointing.save(manager, 3, _state(3)),
    "the run's last wait": lambda: checkpointing.wait_saved(manager, 2, _state(2)),
  }
  for caller, call in waiting_callers.items():
    finished.clear()
    storage.set_budget(100)  # A fresh outage for each.
    with pytest.raises(errors.StorageOutage) as raised:
      call()
    message = str(raised.value)
    assert message.startswith(f'storage {storage_server} unreachable for 100 s'), caller
    assert message.endswith(
      f'while waiting for the checkpoint save in {workdir}/checkpoints: '
      'Cannot connect to host 127.0.0.1'
    ), caller
    assert checkpointing.committed_step(manager) == 1
    waiting = [t for t in threading.enumerate() if t.name == 'checkpoint_wait']
    assert len(waiting) == 1 and waiting[0].daemon  # It cannot keep the process from ending.
    finished.set()
    waiting[0].join(60)
  monkeypatch.undo()
  checkpointing.finish(manager)


def test_a_full_disk_met_by_the_runs_last_wait_is_named_and_the_manager_still_closed(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), 3)
  checkpointing.save(manager, 1, _state(1))
  _FailingInTheBackground(manager, {2}, OSError(errno.ENOSPC, 'No space left on device'))
  checkpointing.save(manager, 2, _state(2))
  closed, close = [], manager.close
  manager.close = lambda: (closed.append(True), close())
  with pytest.raises(errors.DiskFull, match=r'the last complete checkpoint is step 1: free space'):
    checkpointing.finish(manager)
  assert closed == [True]


def test_why_a_step_cannot_be_read_is_one_line_of_at_most_300_characters():
  why = checkpointing._why  # pylint: disable=protected-access
  assert why(ValueError('checksum mismatch\n  in params/w:\tchunk 0')) == (
    'checksum mismatch in params/w: chunk 0'
  )
  assert why(KeyError()) == 'KeyError'
  assert why(OSError('x' * 400)) == 'x' * 300


def test_on_a_local_disk_the_last_wait_raises_its_saves_failure_and_commits_nothing(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), 3)
  checkpointing.save(manager, 1, _state(1))
  _FailingInTheBackground(manager, {2}, OSError(errno.EIO, 'Input/output error'))
  checkpointing.save(manager, 2, _state(2))
  with pytest.raises(OSError, match='Input/output error'):
    checkpointing.wait_saved(manager, 2, _state(2))
  assert checkpointing.committed_step(manager) == 1
  checkpointing.finish(manager)


def _saved_slices(tmp_path, monkeypatch) -> tuple[list[tuple[int, ...]], int]:
  """The shapes Orbax slices while saving, replicated on 8 devices, a norm's 64-float scale and a
  kernel whose slice is exactly the threshold, which must restore whole; and the kernel's rows."""
  sliced = []
  slice_in_dim = jax.lax.slice_in_dim

  def recording(array, *args, **kwargs):
    sliced.append(array.shape)
    return slice_in_dim(array, *args, **kwargs)

  monkeypatch.setattr(replica_slices.jax.lax, 'slice_in_dim', recording)
  replicated = jax.sharding.NamedSharding(
    jax.sharding.Mesh(np.array(jax.devices()), ('data',)), jax.sharding.PartitionSpec()
  )
  assert len(jax.devices()) == 8
  big_rows = 8 * checkpointing.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL // (4 * 16)  # 1/8: threshold.
  state = {
    'scale': jax.device_put(np.arange(64, dtype=np.float32), replicated),
    'kernel': jax.device_put(np.ones((big_rows, 16), np.float32), replicated),
  }
  manager = checkpointing.create_manager(str(tmp_path), 3)
  checkpointing.save(manager, 1, state)
  checkpointing.finish(manager)
  monkeypatch.undo()
  reader = checkpointing.create_manager(str(tmp_path), 3, read_only=True)
  restored = checkpointing.restore_readable(reader, _abstract(jax.device_get(state)))[1]
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(state))
  return sliced, big_rows


def test_small_replicated_arrays_are_written_whole_and_large_ones_split_over_the_replicas(
  tmp_path, monkeypatch
):
  """Orbax slices a replicated array into one part per replica (one eager op per device each):
  in a single process only a kernel-sized array, whose slices are at least the threshold, not a
  norm's scale."""
  sliced, big_rows = _saved_slices(tmp_path, monkeypatch)
  assert sliced == [(big_rows, 16)] * 8  # Each device's copy of the kernel, sliced once.


def test_several_processes_keep_orbaxs_split_of_every_replicated_array(tmp_path, monkeypatch):
  """Where other hosts share the writes (here a process count of 2 is all the module sees),
  Orbax's default stands: the scale is split over the replicas as well."""
  fields = {'process_count': lambda: 2, 'Array': jax.Array, 'tree_util': jax.tree_util}
  monkeypatch.setattr(checkpointing, 'jax', types.SimpleNamespace(**fields))
  sliced, big_rows = _saved_slices(tmp_path, monkeypatch)
  assert sorted(sliced) == sorted([(64,)] * 8 + [(big_rows, 16)] * 8)
