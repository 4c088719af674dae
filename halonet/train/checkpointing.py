"""Orbax checkpoints in workdir/checkpoints: async saves, complete-only restores, full disks.

The directory goes through halonet/paths.py, so a workdir may be a bucket URL: Orbax then marks
each finished step with a commit file instead of renaming it, and only marked steps restore.
"""

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import logging as std_logging
import sys
import threading
from typing import Any
import weakref

from absl import logging
import jax
import orbax.checkpoint as ocp

from halonet import errors
from halonet import paths
from halonet import storage


def quiet_orbax() -> None:
  """Orbax logs dozens of INFO lines per save. A full disk, or an object store out of reach, it
  logs as a traceback from each writer thread and each of their unawaited tasks, as gcsfs does
  from each request and fsspec from each read it prefetches: DiskFull and halonet/storage.py say
  those in one line. Other warnings and errors stay."""
  logging.get_absl_handler().addFilter(_worth_showing)
  if not getattr(sys.unraisablehook, 'drops_closed_loop_callbacks', False):
    sys.unraisablehook = _dropping_closed_loop_callbacks(sys.unraisablehook)


def _worth_showing(record: std_logging.LogRecord) -> bool:
  from_orbax = '/orbax/' in record.pathname
  if not (from_orbax or record.name == 'asyncio' or record.name.startswith(('gcsfs', 'fsspec'))):
    return True
  if from_orbax and record.levelno < std_logging.WARNING:
    return False
  error = record.exc_info[1] if record.exc_info else None
  return not any(
    errors.is_disk_full(e) or storage.is_transient(e)
    for e in (RuntimeError(record.getMessage()), *storage.chain(error))
  )


def _dropping_closed_loop_callbacks(
  hook: Callable[[Any], None],
) -> Callable[[Any], None]:
  """TensorStore completes a failed write's future after the Orbax thread that awaited it has
  closed its event loop; the callback it then cannot schedule is noise, not a second error."""

  def unraisable(info: Any) -> None:
    if not (
      isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == 'Event loop is closed'
    ):
      hook(info)

  unraisable.drops_closed_loop_callbacks = True
  return unraisable


# Orbax splits each replicated array into one slice per replica, so that every host writes a part
# of it: an eager slice op per device and array at each save (and a compile per shape at the first).
# In a single process there is no other host to share the writes with, and for the hundreds of
# small arrays of a network (norms, biases, position tables) the ops cost more than the bytes they
# spread: there, below this size per slice a replicated array is written whole by one replica
# (0.9 s less per save of a tiny model on 8 devices). Runs of several processes keep Orbax's split.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 64 * 1024
_array_writes = {'min_slice_bytes': None}  # What Orbax's jax.Array handler was last given.


def _set_array_writes() -> None:
  """Gives Orbax's jax.Array handler the threshold in a single process, once, without Orbax's
  warning that a registration replaced its default (the replacement is the point)."""
  min_slice_bytes = MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL if jax.process_count() == 1 else None
  if _array_writes['min_slice_bytes'] == min_slice_bytes:
    return
  absl_logger = std_logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
      jax.Array,
      ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=min_slice_bytes),
      override=True,
    )
  finally:
    absl_logger.setLevel(level)
  _array_writes['min_slice_bytes'] = min_slice_bytes


def _not_read_only_notice(record: std_logging.LogRecord) -> bool:
  """False for Orbax's warnings that a read-only manager will not write: a reader's point."""
  message = record.getMessage()
  return not (
    '/orbax/' in record.pathname and ('read only' in message or 'read_only=True' in message)
  )


def create_manager(
  workdir: paths.PathLike, keep: int, read_only: bool = False
) -> ocp.CheckpointManager:
  """Async manager in workdir/checkpoints keeping the last `keep` steps.

  Orbax writes each step under a temporary name and renames it when complete (on an object
  store: writes a commit marker last), so a crash mid-save leaves a step that `latest_step` never
  returns; a writer deletes such leftovers in the background, finished before its first save.
  Readers (eval.py) open read-only so they never touch a live run's files.
  """
  _set_array_writes()
  if read_only:  # At absl's logger, before any handler: a notebook's trained.load is quiet too.
    std_logging.getLogger('absl').addFilter(_not_read_only_notice)  # Once: addFilter dedupes.
  options = ocp.CheckpointManagerOptions(
    preservation_policy=ocp.checkpoint_managers.LatestN(keep),
    enable_async_checkpointing=True,
    cleanup_tmp_directories=not read_only,
    read_only=read_only,
  )
  # The handler named up front, so a fresh manager can read a step's metadata (shape_mismatch).
  manager = ocp.CheckpointManager(
    paths.path(paths.as_string(workdir)) / 'checkpoints',
    item_handlers=ocp.StandardCheckpointHandler(),
    options=options,
  )
  if not read_only:
    _saves[manager] = _Saves(committed=manager.latest_step())
  return manager


@dataclasses.dataclass
class _Saves:
  committed: int | None  # The newest step known complete: what a rerun would resume from.
  pending: int | None = None  # Saving in the background.


PROBE_EVERY_S = 30.0

# Kept per manager, so that an outage (when the store cannot be listed) can still name the step.
_saves: 'weakref.WeakKeyDictionary[ocp.CheckpointManager, _Saves]' = weakref.WeakKeyDictionary()


def committed_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest step this process knows complete, without asking the store."""
  saves = _saves.get(manager)
  return saves.committed if saves else None


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Starts an async save; the device->host copy finishes before return, so donation is safe.

  A failure of the previous async save surfaces here; a full disk is reported as such. On an
  object store a transient failure (of this save or the one before) is retried through an outage
  with this step's state: a step whose save failed has no commit marker and is never restored.
  """
  _saved_through_outages(manager, step, state, wait=False)


def wait_saved(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Waits for the background save of `step` (the run's last), saving it again if it failed
  transiently on an object store."""
  _saved_through_outages(manager, step, state, wait=True)


def _saved_through_outages(
  manager: ocp.CheckpointManager, step: int, state: Any, *, wait: bool
) -> None:
  saves = _saves[manager]
  start_save, clean = not wait, True

  def attempt() -> None:
    nonlocal start_save, clean
    try:
      with _disk_full_reported(manager):
        if start_save:
          _wait_probing_the_store(manager)
          manager.save(step, args=ocp.args.StandardSave(state), force=True)
          if clean and saves.pending not in (None, step):  # Orbax waited for it: complete.
            saves.committed = saves.pending
          saves.pending = step
        start_save = True
        if wait:
          _wait_probing_the_store(manager)
          saves.committed, saves.pending = step, None
    except Exception:
      clean = False
      raise

  paths.on_store(paths.path(manager.directory), f'saving checkpoint step {step} in', attempt)


def _wait_probing_the_store(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in the background, raising its error if it failed. TensorStore retries
  a write through an outage for many minutes without a word, so a long wait probes the store:
  an outage is then counted against the run's budget and, past it, ends the wait with
  errors.StorageOutage (the waiting thread is left to the process's end)."""
  directory = paths.path(manager.directory)
  if not paths.is_url(directory):
    manager.wait_until_finished()
    return
  done, failure = threading.Event(), []

  def wait() -> None:
    try:
      manager.wait_until_finished()
    except BaseException as e:  # pylint: disable=broad-except  # Raised below, in the caller.
      failure.append(e)
    finally:
      done.set()

  threading.Thread(target=wait, daemon=True, name='checkpoint_wait').start()
  while not done.wait(PROBE_EVERY_S):
    paths.on_store(directory, 'waiting for the checkpoint save in', directory.exists)
  if failure:
    raise failure[0]


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the last async save (reporting a full disk as such) and closes the manager."""
  try:
    with _disk_full_reported(manager):
      manager.wait_until_finished()
  finally:
    manager.close()


@contextlib.contextmanager
def _disk_full_reported(manager: ocp.CheckpointManager) -> Iterator[None]:
  try:
    yield
  except Exception as e:  # Orbax re-raises TensorStore's write errors as ValueError.
    if not errors.is_disk_full(e):
      raise
    try:  # Saves still in flight may complete (or fail too): then read what is on disk.
      manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  # Reported by the error raised below.
      pass
    complete = ocp.path.step.checkpoint_steps(manager.directory)
    last = f'step {max(complete)}' if complete else 'none'
    raise errors.DiskFull(
      f'disk full while writing a checkpoint in {manager.directory}; the last complete '
      f'checkpoint is {last}: free space, then rerun the same command to resume from it'
    ) from e


class ShapeMismatch(errors.ConfigError):
  """A step's arrays do not fit the state a config builds (shape_mismatch says which)."""

  def __init__(self, step: int, why: str):
    super().__init__(f'step {step}: {why}')
    self.step, self.why = step, why


# Where a step that cannot be read is moved: beside the others under a name Orbax takes for no
# step, so it is never resumed from, counted among the kept steps or cleaned up.
DAMAGED = '{step}.damaged'


def _why(error: BaseException) -> str:
  return ' '.join(str(error).split())[:300] or type(error).__name__


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves a damaged `step` to STEP.damaged (.1, .2, ... if taken); returns where. Never deletes."""
  directory = paths.path(manager.directory)
  target = paths.unused_path(directory / DAMAGED.format(step=step))
  paths.move_directory(directory / str(step), target)
  manager.reload()
  return target


def restore_readable(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  step: int | None = None,
  *,
  set_aside_damaged: bool = False,
  say: Any = print,
) -> tuple[int, Any]:
  """(step, state) of `step`, or with None of the newest step whose files read whole onto the
  shardings of abstract_state. A newer step that cannot be read (a truncated, missing or garbled
  file under a standing commit marker) is stepped over with one line naming it and why; a writer
  (`set_aside_damaged`) also moves it aside, so no later run takes it for complete. A requested
  step that cannot be read fails in one line. Shapes are checked first (shape_mismatch): a step
  that does not fit is the caller's error, not damage, and raises ShapeMismatch."""
  where = paths.as_string(manager.directory)
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  if step is not None and step not in manager.all_steps():
    raise FileNotFoundError(
      f'no complete checkpoint for step={step} in {where}; have {sorted(manager.all_steps())}'
    )
  for candidate in steps:
    try:
      mismatch = shape_mismatch(manager, candidate, abstract_state)
      if mismatch is None:
        return candidate, manager.restore(candidate, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except  # Each store and format fails its own way.
      if step is not None:
        raise errors.ConfigError(
          f'checkpoint step {step} in {where} cannot be read: {_why(e)}'
        ) from None
      moved = f'; moved to {set_aside(manager, candidate)}' if set_aside_damaged else ''
      say(
        f'checkpoint step {candidate} in {where} cannot be read ({_why(e)}){moved}; '
        'trying the step before it'
      )
      continue
    raise ShapeMismatch(candidate, mismatch)
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint in {where}')
  raise FileNotFoundError(f'no readable checkpoint in {where} (steps {sorted(steps)} are damaged)')


def resume(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  workdir: paths.PathLike,
  *,
  advice: str,
  say: Any = print,
) -> tuple[int, Any | None]:
  """(step, state) of a run's newest readable checkpoint (a damaged newer one moved aside, named),
  or (0, None) when there is none to resume: a workdir whose only checkpoint is step 0 (a
  converted run) resumes from it. A checkpoint of other shapes stops the run in one line ending
  with `advice` (what to do instead): no flag resumes a checkpoint into another state."""
  if manager.latest_step() is None:
    return 0, None
  try:
    return restore_readable(manager, abstract_state, set_aside_damaged=True, say=say)
  except ShapeMismatch as e:
    manager.close()
    raise errors.ConfigError(
      f'cannot resume {paths.as_string(workdir)} from step {e.step} with this config: '
      f'{e.why}; {advice}'
    ) from None
  except FileNotFoundError:
    say(f'no checkpoint in {paths.as_string(workdir)} could be read: starting at step 0')
    return 0, None


@contextlib.contextmanager
def naming_last_commit(manager: ocp.CheckpointManager) -> Iterator[None]:
  """A StorageOutage inside says which checkpoint a rerun would resume from."""
  try:
    yield
  except errors.StorageOutage as e:
    committed = committed_step(manager)
    last = 'none' if committed is None else f'step {committed}'
    raise errors.StorageOutage(
      f'{e}; the last committed checkpoint is {last}: '
      'rerun the same command once the store is back to resume from it'
    ) from None


def _name(path: tuple[Any, ...]) -> str:
  """'params/stage1_block0/conv/kernel' for a key path of either a state or Orbax's metadata."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def shape_mismatch(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> str | None:
  """Why `step`'s arrays cannot be restored into `abstract_state`, from shapes alone (the files'
  metadata, nothing read or compiled), or None when every array has its saved shape."""
  saved = {
    _name(p): tuple(m.shape)
    for p, m in jax.tree_util.tree_flatten_with_path(manager.item_metadata(step))[0]
  }
  wanted = {
    _name(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  }
  for name in sorted(saved.keys() | wanted.keys()):
    if name not in wanted:
      return f"{name} {saved[name]} is in the checkpoint but not in this config's state"
    if name not in saved:
      return f"{name} {wanted[name]} is in this config's state but not in the checkpoint"
    if saved[name] != wanted[name]:
      return f'{name} has shape {saved[name]} in the checkpoint but {wanted[name]} in this config'
  return None
