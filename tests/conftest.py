"""Eight fake CPU devices for sharding tests; must run before jax is imported.

XLA:CPU also expands optimization barriers and CSEs rematerialised blocks away; keeping them, as
the TPU and GPU compilers do, makes the CPU buffer plan show what remat saves on an accelerator.
Many tests (and the train.py subprocesses they start, which inherit the environment) compile the
same tiny steps: with compile_flags.py's flags, and through a session-wide JAX compilation cache
that compiles each once, then loads it.
"""

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import compile_flags  # pylint: disable=g-import-not-at-top

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  f' --xla_disable_hlo_passes=cse_barrier_expander {compile_flags.FAST_COMPILE}'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# pytest-xdist workers inherit the first process's cache, so each step compiles once in all.
if 'HALONET_TESTS_JAX_CACHE' not in os.environ:
  os.environ['HALONET_TESTS_JAX_CACHE'] = tempfile.mkdtemp(prefix='halonet_tests_jax_cache_')
  atexit.register(shutil.rmtree, os.environ['HALONET_TESTS_JAX_CACHE'], ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['HALONET_TESTS_JAX_CACHE']
# pytest-xdist workers inherit the first process's measurement: one per session.
if 'HALONET_TESTS_SLOWDOWN' not in os.environ:
  from tests import load  # pylint: disable=g-import-not-at-top

  os.environ['HALONET_TESTS_SLOWDOWN'] = f'{load.measure_slowdown():.2f}'


# pylint: disable=wrong-import-position
import subprocess

import pytest

from halonet import storage
from tests import storage_server as storage_server_lib

_DIE_WITH_PARENT = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), 'scripts', 'die_with_parent.py'
)
_popen_init = subprocess.Popen.__init__


def _dies_with_its_parent(self, args, *rest, **kwargs):
  """Every child a test starts (train.py runs, the storage server) is started through
  scripts/die_with_parent.py, so it ends when the process that started it ends, however that
  ends (a SIGKILLed runner included). Commands given as a string or through a shell are left as
  they are."""
  if sys.platform == 'linux' and isinstance(args, (list, tuple)) and not kwargs.get('shell'):
    if kwargs.get('executable') is None:
      args = [sys.executable, '-S', _DIE_WITH_PARENT, str(os.getpid()), *map(os.fspath, args)]
  _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _dies_with_its_parent

BUCKET = 'test-bucket'


@pytest.fixture(scope='session')
def storage_server():
  """tests/storage_server.py's server holding BUCKET in memory, with gcsfs and TensorStore in
  this process and in every subprocess a test starts pointed at it. Killed at the end of the
  session."""
  server = storage_server_lib.StorageServer(BUCKET)
  saved = {}
  try:
    server.start()
    settings = server.settings()
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield f'gs://{BUCKET}'
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()
    shutil.rmtree(server.folder, ignore_errors=True)


class FakeStorageClock:
  """Time for halonet/storage.py's retries: each sleep advances it and is kept in `sleeps`."""

  def __init__(self):
    self.now, self.sleeps = 0.0, []

  def sleep(self, seconds: float) -> None:
    self.sleeps.append(seconds)
    self.now += seconds


@pytest.fixture
def storage_clock(monkeypatch):
  """Fake time for outages, with a fresh budget of 100 s; the default budget after."""
  clock = FakeStorageClock()
  monkeypatch.setattr(storage, '_clock', lambda: clock.now)
  monkeypatch.setattr(storage, '_sleep', clock.sleep)
  storage.set_budget(100)
  yield clock
  storage.set_budget(storage.DEFAULT_BUDGET_S)


def pytest_collection_modifyitems(items):
  """The files holding slow end-to-end runs first, each file's tests kept together: the two
  workers take files in this order, so the longest runs start early instead of running alone at
  the end of the session."""
  slow_files = {item.path for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.path not in slow_files)
