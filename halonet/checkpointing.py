"""What a workdir keeps between runs: Orbax checkpoints, the starting config, JSON results."""

import contextlib
import itertools
import json
import logging as std_logging
import os
from collections.abc import Iterator
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import ml_collections
import orbax.checkpoint as ocp

from halonet import errors

# What a resumed run may change: how it is run and observed, and how long it trains (the
# learning-rate schedule then follows the new length from the resumed step on). Any other
# change would make the resumed run a different experiment, and is refused unless allowed.
RESUMABLE_FIELDS = ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                    'keep_checkpoints', 'eval_splits', 'eval_batch_size', 'mesh_shape',
                    'data_dir', 'manual_dir', 'cache', 'num_epochs', 'num_train_steps',
                    'profile_steps')
# What a checkpoint's arrays depend on: evaluating it with other values here cannot work.
CHECKPOINT_FIELDS = ('model', 'num_classes')


def quiet_orbax_info_logs() -> None:
  """Orbax logs dozens of INFO lines per save through absl; keep its warnings only, except
  those saying that a reader's (read-only) manager will not write, which is the point."""
  def shown(record: std_logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    message = record.getMessage()
    return (record.levelno >= std_logging.WARNING and 'read only' not in message
            and 'read_only=True' not in message)
  logging.get_absl_handler().addFilter(shown)


def create_manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  """Async manager in workdir/checkpoints keeping the last `keep` steps.

  Orbax writes each step under a temporary name and renames it when complete, so a crash
  mid-save leaves a tmp dir that `latest_step` never returns; a writer deletes such leftovers
  in the background, finished before its first save. Readers (eval.py) open read-only so they never touch a live run's files.
  """
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      enable_async_checkpointing=True,
      cleanup_tmp_directories=not read_only,
      read_only=read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Starts an async save; the device->host copy finishes before return, so donation is safe.

  A failure of the previous async save surfaces here; a full disk is reported as such.
  """
  with _disk_full_reported(manager):
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


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


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """Restores `step` (default: latest complete) onto the shardings carried by abstract_state."""
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'no complete checkpoint for step={step} in {manager.directory}; '
                            f'have {sorted(manager.all_steps())}')
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def write_json_atomic(path: str, obj: Any) -> None:
  """Write-then-rename, so a reader or a crash never sees half a file (process 0 only).

  The temporary file is opened like any other (not with tempfile, which makes it 0600), so
  the result has the permissions the user's umask gives.
  """
  if jax.process_index() != 0:
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.tmp_{os.getpid()}_{os.path.basename(path)}')
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def append_json_lines(path: str, records: list[dict[str, Any]]) -> None:
  """Appends one JSON object per line (process 0 only): earlier records are never rewritten."""
  if jax.process_index() != 0:
    return
  with open(path, 'a') as f:
    f.write(''.join(json.dumps(r, sort_keys=True) + '\n' for r in records))


def unused_path(path: str) -> str:
  """`path`, or the first of NAME.1.EXT, NAME.2.EXT, ... that does not exist yet."""
  stem, ext = os.path.splitext(path)
  candidates = itertools.chain([path], (f'{stem}.{n}{ext}' for n in itertools.count(1)))
  return next(p for p in candidates if not os.path.exists(p))


def read_json_lines(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Dotted names of the fields whose values differ between two configs (as JSON dicts)."""
  old_flat, new_flat = (traverse_util.flatten_dict(c, sep='.') for c in (old, new))
  return sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))


def refused_on_resume(fields: list[str]) -> list[str]:
  return [f for f in fields if f.split('.')[0] not in RESUMABLE_FIELDS]


def refused_for_eval(fields: list[str]) -> list[str]:
  return [f for f in fields if f.split('.')[0] in CHECKPOINT_FIELDS]


def stored_config(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, 'config.json')
  return read_json(path) if os.path.exists(path) else None


def check_and_store_config(config: ml_collections.ConfigDict, workdir: str,
                           allow_change: bool, step: int) -> None:
  """Records the config on first start; on restart refuses a changed one unless allowed.

  A changed config (one RESUMABLE_FIELDS allows, or any when allowed) replaces config.json and
  the old one is kept as config.step<step>.json (.1, .2, ... on further restarts at that step),
  so no history is lost.
  """
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  old = stored_config(workdir)
  if old is not None:
    changes = changed_fields(old, new)
    if not changes:
      return
    refused = refused_on_resume(changes)
    if refused and not allow_change:
      raise errors.ConfigError(
          f'{path} was written by a different config (fields: {", ".join(refused)}); '
          'pass --allow_config_change to resume anyway')
    if jax.process_index() == 0:
      os.replace(path, unused_path(os.path.join(workdir, f'config.step{step}.json')))
  write_json_atomic(path, new)
