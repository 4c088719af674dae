"""One run per workdir: a run holds a lease (workdir/lease.json) from before it writes anything
until it ends, so a double launch or a scheduler's retry while the first still runs stops in one
line naming the owner instead of mixing two runs' checkpoints and events.

The lease is created atomically (an exclusive create on a local disk, a conditional upload on an
object store, which the store decides alone) and renewed every RENEW_S seconds by a thread while
the run lives. A lease left by a run that died without releasing it is taken over, said in one
line: at once when its process is gone from this very host, else once it has not been renewed
for STALE_S seconds (so a preempted job restarts by itself). A taker looks at the lease once more
just before removing it. In a multi-host run process 0 holds the lease and every process learns
the outcome from it.
"""

from collections.abc import Callable
import json
import os
import socket
import threading
import time
from typing import Any
import uuid

from absl import logging
import jax

from halonet import errors
from halonet import paths
from halonet import sharding
from halonet import storage

LEASE = 'lease.json'
RENEW_S = 60.0
STALE_S = 300.0


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


def _owner(record: dict[str, Any]) -> str:
  return f'pid {record["pid"]} on {record["host"]}'


class Lease:
  """A held lease: renewed by a daemon thread until `release`."""

  def __init__(self, target: str, record: dict[str, Any], clock: Callable[[], float]):
    self._target, self._record, self._clock = target, record, clock
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew_forever, daemon=True, name='lease')
    self._thread.start()

  def _ours(self) -> bool:
    try:
      return paths.read_json(self._target).get('token') == self._record['token']
    except (FileNotFoundError, ValueError):
      return False

  def renew(self) -> None:
    """Writes a new renewal time, if the lease is still this run's."""
    if self._ours():
      self._record['renewed'] = self._clock()
      paths.write_bytes(self._target, json.dumps(self._record, indent=2).encode())
    else:
      logging.warning(
        "the lease %s is no longer this run's: another run took it over", self._target
      )

  def _renew_forever(self) -> None:
    while not self._stop.wait(RENEW_S):
      try:
        self.renew()
      except Exception as e:  # pylint: disable=broad-except  # A storage hiccup: next time.
        if not storage.outage_declared():  # Else the run is ending, saying why in one line.
          logging.warning('renewing the lease %s failed: %s', self._target, e)

  def release(self) -> None:
    """Stops renewing and removes the lease if it is still this run's."""
    self._stop.set()
    self._thread.join()
    if self._ours():
      paths.path(self._target).unlink()


def _take(target: str, clock: Callable[[], float], say: Callable[[str], None]) -> Lease:
  """The lease of this process (process 0 of a run), or ConfigError naming the live owner."""
  now = clock()
  record = {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'started': now,
    'renewed': now,
    'token': uuid.uuid4().hex,
  }
  data = json.dumps(record, indent=2).encode()
  for _ in range(3):  # A lease that vanishes between two looks is simply taken next time.
    if paths.create_new(target, data):
      return Lease(target, record, clock)
    try:
      held = paths.read_json(target)
    except FileNotFoundError:
      continue
    except ValueError:  # Cut short by a crash mid-write: nobody holds it.
      held = {'host': '?', 'pid': 0, 'renewed': 0.0}
    idle = now - float(held.get('renewed', 0.0))
    dead_here = held.get('host') == record['host'] and not _pid_alive(int(held.get('pid', 0)))
    if not (dead_here or idle > STALE_S):
      raise errors.ConfigError(
        f'{paths.as_string(target)}: the workdir is in use by the run of {_owner(held)} '
        f'(renewed {idle:.0f} s ago); wait for it to end or train in another workdir (a lease '
        f'not renewed for {STALE_S:.0f} s is taken over)'
      )
    try:  # Looked at once more just before it goes: another taker may have been quicker.
      if paths.read_json(target) != held:
        continue
    except (FileNotFoundError, ValueError):
      pass
    why = 'its process is gone' if dead_here else f'not renewed for {idle:.0f} s'
    say(f'took over the lease of a run that ended without releasing it ({_owner(held)}: {why})')
    paths.path(target).unlink(missing_ok=True)
  raise errors.ConfigError(f"{paths.as_string(target)}: could not take the workdir's lease")


def acquire(
  workdir: paths.PathLike,
  say: Callable[[str], None] = print,
  clock: Callable[[], float] = time.time,
) -> Lease | None:
  """This run's lease on `workdir` (None on processes other than 0, which hold none); every
  process raises the same one-line ConfigError when another live run holds it."""
  target = paths.as_string(paths.path(workdir) / LEASE)
  lease, refusal = None, None
  if jax.process_index() == 0:
    try:
      lease = _take(target, clock, say)
    except errors.ConfigError as e:
      refusal = str(e)
  refusal = sharding.broadcast_json(refusal, "the workdir's lease", timeout_s=600)
  if refusal:
    raise errors.ConfigError(refusal)
  return lease
