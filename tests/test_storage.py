"""halonet/storage.py: which failures are retried, for how long, and what a person reads.

The errors are the clients' own types and texts (aiohttp's, gcsfs's HttpError, TensorStore's
status text); time is a fake clock that the retries' sleeps advance.
"""

import logging

import aiohttp
from gcsfs import retry as gcsfs_retry
import pytest
import yarl

from halonet import defaults
from halonet import errors
from halonet import storage


def _failing(times, error):
  calls = []

  def operation():
    calls.append(1)
    if len(calls) <= times:
      raise error
    return 'done'

  return operation, calls


def _raised_from(cause):
  try:
    try:
      raise cause
    except Exception as e:
      raise RuntimeError('Save Finalize thread failed') from e
  except RuntimeError as outer:
    return outer


def _http_answer(status):
  url = yarl.URL('http://127.0.0.1/storage/v1/b/b/o/x')
  request = aiohttp.RequestInfo(url=url, method='GET', headers={}, real_url=url)
  return aiohttp.ClientResponseError(request, (), status=status, message='answer')


def _raised_while_handling(cause):
  """`raise` inside `except` without `from`: the cause is the context."""
  try:
    try:
      raise cause
    except Exception:
      raise RuntimeError('writing the events failed')  # noqa: B904
  except RuntimeError as outer:
    return outer


def _cycle():
  """Two errors each the other's context, as asyncio can leave them."""
  first, second = KeyError('a'), KeyError('b')
  first.__context__, second.__context__ = second, first
  return first


# Cloud Storage's transient HTTP statuses (its retry guidance): a request timeout, too many
# requests, and the server errors but 501.
_TRANSIENT_CODES = (408, 429, 500, 502, 503, 504)


@pytest.mark.parametrize(
  'error, transient',
  [
    (aiohttp.ServerDisconnectedError(), True),
    (ConnectionRefusedError(111, 'Connect call failed'), True),
    (TimeoutError(), True),
    *[(gcsfs_retry.HttpError({'code': c, 'message': 'busy'}), True) for c in _TRANSIENT_CODES],
    (gcsfs_retry.HttpError({'code': 501, 'message': 'Not Implemented'}), False),
    (gcsfs_retry.HttpError({'code': 409, 'message': 'Conflict'}), False),
    (_http_answer(404), False),
    (_http_answer(503), True),
    (gcsfs_retry.HttpError({'code': 403, 'message': 'forbidden'}), False),
    (ValueError('UNAVAILABLE: Error writing "params/0" in OCDBT database'), True),
    (ValueError('DEADLINE_EXCEEDED: reading "d/1f"'), True),
    (ValueError('INVALID_ARGUMENT: bucket name "b"'), False),
    (FileNotFoundError('gs://b/run/results.json'), False),
    (_raised_from(aiohttp.ServerDisconnectedError()), True),
    (_raised_from(KeyError('params')), False),
    (_raised_while_handling(ConnectionResetError()), True),
    (_cycle(), False),
  ],
)
def test_transient_failures_are_told_from_lasting_ones(error, transient):
  assert storage.is_transient(error) is transient


def test_an_outage_within_budget_is_retried_and_named_when_it_begins_and_ends(
  storage_clock, caplog
):
  operation, calls = _failing(4, aiohttp.ServerDisconnectedError())
  with caplog.at_level(logging.WARNING):
    assert storage.retried(operation, what='writing x', where='gs://b') == 'done'
  assert len(calls) == 5
  assert storage_clock.now == 1 + 2 + 4 + 8  # Exponential backoff from one second.
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 2, lines
  assert lines[0] == (
    'storage gs://b unreachable while writing x (Server disconnected): retrying for up to 100 s'
  )
  assert lines[1] == 'storage gs://b reachable again after 15 s; writing x done'
  assert not storage.outage_declared()


def test_an_operation_that_never_failed_says_nothing(storage_clock, caplog):
  with caplog.at_level(logging.WARNING):
    assert storage.retried(lambda: 'done', what='writing x', where='gs://b') == 'done'
  assert caplog.records == []


def test_a_long_outage_is_named_in_minutes(storage_clock):
  storage.set_budget(600)
  operation, _ = _failing(10**6, ConnectionResetError())
  with pytest.raises(errors.StorageOutage) as raised:
    storage.retried(operation, what='writing x', where='gs://b')
  assert str(raised.value).startswith('storage gs://b unreachable for 10.0 min ')
  assert (
    storage_clock.sleeps[:7] == [1, 2, 4, 8, 16, 32, 60] and max(storage_clock.sleeps) == 60
  )  # Capped at a minute.
  assert str(raised.value).endswith('while writing x: ConnectionResetError')


def test_an_outage_past_its_budget_ends_in_one_error_and_nothing_waits_after(storage_clock):
  operation, calls = _failing(10**6, gcsfs_retry.HttpError({'code': 503, 'message': 'down'}))
  with pytest.raises(errors.StorageOutage) as raised:
    storage.retried(operation, what='saving checkpoint step 8', where='gs://b')
  message = str(raised.value)
  assert message.startswith('storage gs://b unreachable for 100 s')
  assert 'storage_outage_minutes' in message and 'while saving checkpoint step 8' in message
  assert 100 <= storage_clock.now < 100 + storage.LONGEST_WAIT_S
  assert storage.outage_declared()
  tried = len(calls)
  with pytest.raises(errors.StorageOutage):
    storage.retried(operation, what='writing events', where='gs://b')
  assert len(calls) == tried


def test_a_lasting_failure_is_raised_at_once(storage_clock):
  operation, calls = _failing(1, PermissionError('403 Forbidden'))
  with pytest.raises(PermissionError):
    storage.retried(operation, what='writing x', where='gs://b')
  assert len(calls) == 1 and storage_clock.now == 0


def test_operations_during_one_outage_share_its_budget(storage_clock):
  """The lease's thread and the main thread meet the same outage: the budget runs from its
  start, whichever operation met it first."""
  calls = []

  def first():
    calls.append(1)
    if len(calls) < 3:
      raise ConnectionResetError()
    raise PermissionError('403')  # Ends this operation, not the outage.

  with pytest.raises(PermissionError):
    storage.retried(first, what='renewing the lease', where='gs://b')
  storage_clock.now += 90
  second, _ = _failing(10**6, ConnectionResetError())
  began = storage_clock.now
  with pytest.raises(errors.StorageOutage):
    storage.retried(second, what='saving', where='gs://b')
  assert storage_clock.now - began <= 10


def test_a_new_outage_after_the_store_came_back_gets_a_whole_budget(storage_clock):
  first, _ = _failing(3, ConnectionResetError())
  storage.retried(first, what='a', where='gs://b')  # 1 + 2 + 4 s, then back: incident over.
  second, _ = _failing(10**6, ConnectionResetError())
  with pytest.raises(errors.StorageOutage) as raised:
    storage.retried(second, what='b', where='gs://b')
  assert 'unreachable for 100 s' in str(raised.value)


def test_commands_that_set_no_budget_get_the_configs_default():
  """eval.py and predict.py read a bucket without a training config's field."""
  assert storage.DEFAULT_BUDGET_S == 60 * defaults.base_config().storage_outage_minutes
