"""Object-store outages: transient failures retried for a budget, one that outlasts it named.

Cloud Storage answers 429 and 5xx and resets connections as a matter of course; gcsfs and
TensorStore retry each request a few times, which covers a hiccup but not a minute-long outage.
Every write and read of a run goes through `retried`, which keeps trying with exponential
backoff until `budget_s` has passed since the outage began (one incident for all threads), says
so in one line when it begins and when it ends, and then raises errors.StorageOutage. After that
nothing waits on the store again: the run ends at once instead of retrying every clean-up write.
"""

from collections.abc import Callable, Iterator
import threading
import time
from typing import TypeVar

from absl import logging

from halonet import errors

T = TypeVar('T')

DEFAULT_BUDGET_S = 600.0
FIRST_WAIT_S, LONGEST_WAIT_S = 1.0, 60.0

# What a transient failure looks like in each client's errors: TensorStore's status codes and
# HTTP statuses inside its ValueError texts, aiohttp's (gcsfs's) connection errors.
_TRANSIENT_TEXTS = (
  'UNAVAILABLE',
  'DEADLINE_EXCEEDED',
  'Connect call failed',
  'Cannot connect to host',
  'Connection reset',
  'Server disconnected',
  'HTTP response code: 429',
  'HTTP response code: 5',
)
_TRANSIENT_CODES = {408, 429, 500, 502, 503, 504}


def is_transient(error: BaseException) -> bool:
  """Whether `error` (or one it was raised from) is a failure a retry may cure."""
  for e in chain(error):
    if isinstance(e, (ConnectionError, TimeoutError)):
      return True
    code = getattr(e, 'status', None)  # aiohttp's; gcsfs's HttpError has `code`.
    code = code if isinstance(code, int) else getattr(e, 'code', None)
    if isinstance(code, int) and code in _TRANSIENT_CODES:
      return True
    if type(e).__module__.startswith('aiohttp') and not isinstance(code, int):
      return True  # A connection error, not an HTTP answer.
    if any(text in str(e) for text in _TRANSIENT_TEXTS):
      return True
  return False


def chain(error: BaseException | None) -> Iterator[BaseException]:
  """`error` and the exceptions it was raised from or while handling."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


class _Incident:
  """The outage in progress, shared by every thread of the process."""

  def __init__(self):
    self.lock = threading.Lock()
    self.budget_s = DEFAULT_BUDGET_S
    self.began: float | None = None
    self.declared: errors.StorageOutage | None = None


_incident = _Incident()
_clock: Callable[[], float] = time.monotonic
_sleep: Callable[[float], None] = time.sleep


def set_budget(seconds: float) -> None:
  """How long an outage may last before the run stops (config.storage_outage_minutes)."""
  with _incident.lock:
    _incident.budget_s, _incident.began, _incident.declared = float(seconds), None, None


def outage_declared() -> bool:
  """Whether an outage outlasted the budget in this process: nothing should wait on the store."""
  return _incident.declared is not None


def retried(operation: Callable[[], T], *, what: str, where: str) -> T:
  """`operation()`, retried while it fails transiently and the outage is within budget.

  `what` names the operation ('saving checkpoint step 8') and `where` the store ('gs://b/run')
  in the lines a person reads.
  """
  wait = FIRST_WAIT_S
  while True:
    if _incident.declared is not None:
      raise _incident.declared
    try:
      result = operation()
    except errors.StorageOutage:  # Declared by a retry inside `operation`: already named.
      raise
    except Exception as e:  # pylint: disable=broad-except  # Each client raises its own kind.
      if not is_transient(e):
        raise
      with _incident.lock:
        now = _clock()
        if _incident.began is None:
          _incident.began = now
          logging.warning(
            'storage %s unreachable while %s (%s): retrying for up to %s',
            where,
            what,
            _short(e),
            _minutes(_incident.budget_s),
          )
        left = _incident.began + _incident.budget_s - now
        if left <= 0:
          _incident.declared = errors.StorageOutage(
            f'storage {where} unreachable for {_minutes(now - _incident.began)} '
            f'(config.storage_outage_minutes={_incident.budget_s / 60:g}) while {what}: '
            f'{_short(e)}'
          )
          raise _incident.declared from e
      _sleep(min(wait, left))
      wait = min(2 * wait, LONGEST_WAIT_S)
      continue
    with _incident.lock:
      if _incident.began is not None:
        logging.warning(
          'storage %s reachable again after %s; %s done',
          where,
          _minutes(_clock() - _incident.began),
          what,
        )
        _incident.began = None
    return result


def _short(error: BaseException) -> str:
  return ' '.join(str(error).split())[:200] or type(error).__name__


def _minutes(seconds: float) -> str:
  return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.1f} min'
