"""A bucket that goes away mid-run: against tests/storage_server.py's server, stopped and started
again on its port with its objects kept on disk.

An outage shorter than config.storage_outage_minutes costs time only: the run goes on and ends
bit-identical to an unbroken one. A longer one ends the run in one line naming the bucket and the
last committed checkpoint, and the same command resumes from it once the store is back.
"""

import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from halonet.train import checkpointing
from halonet.train import loop as train_lib
from tests import load
from tests import storage_server as storage_server_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = 'outage-bucket'
STEPS = 10
FLAGS = [
  '--config=configs/tiny.py',
  f'--config.num_train_steps={STEPS}',
  '--config.checkpoint_every_steps=2',
  '--config.keep_checkpoints=100',
]
TIMEOUT_S = load.timeout(300)
OUTAGE_S = 40  # Past gcsfs's own retries (about 31 s), so the run's retries are what cures it.


def digest(workdir: str) -> tuple[str, str]:
  """The final checkpoint's step and one digest of its arrays, read through the run's layers."""
  manager = checkpointing.create_manager(workdir, 100, read_only=True)
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  hashed = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(state)):
    hashed.update(np.ascontiguousarray(leaf).tobytes())
  return str(step), hashed.hexdigest()


# digest() in a process pointed at the outage server: one line per workdir.
DIGESTS = (
  'import sys\n'
  'from tests.train.test_storage_outage import digest\n'
  'for workdir in sys.argv[1:]:\n'
  '  print(*digest(workdir))\n'
)


def _python(*args, env=None):
  """A finished subprocess in the repository, whose exit status must be 0."""
  done = subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _digests(env, *workdirs):
  return [
    tuple(line.split()) for line in _python('-c', DIGESTS, *workdirs, env=env).stdout.splitlines()
  ]


class _Run:
  """train.py in the background, its stdout lines readable as they come."""

  def __init__(self, workdir, env, *extra):
    self.process = subprocess.Popen(
      [sys.executable, 'train.py', f'--workdir={workdir}', *FLAGS, *extra],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.lines, self.stdout = queue.Queue(), []
    self.stderr = []
    threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True).start()
    threading.Thread(target=self.stderr.extend, args=(self.process.stderr,), daemon=True).start()

  @staticmethod
  def _read(stream, lines):
    for line in stream:
      lines.put(line)

  def wait_for(self, text):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
      try:
        line = self.lines.get(timeout=1)
      except queue.Empty:
        assert self.process.poll() is None, ''.join(self.stdout + self.stderr)[-3000:]
        continue
      self.stdout.append(line)
      if text in line:
        return
    raise AssertionError(f'no line with {text!r} in {TIMEOUT_S:.0f} s')

  def finish(self):
    try:
      self.process.wait(timeout=TIMEOUT_S)
    finally:
      self.process.kill()
    time.sleep(0.5)  # The readers reach the end of the pipes.
    while not self.lines.empty():
      self.stdout.append(self.lines.get())
    return self.process.returncode, ''.join(self.stdout), ''.join(self.stderr)


@pytest.fixture
def outage_server(tmp_path):
  server = storage_server_lib.StorageServer(BUCKET, root=str(tmp_path / 'objects'))
  server.start()
  try:
    yield server
  finally:
    server.stop()


@pytest.mark.slow
def test_a_short_outage_costs_time_only_and_a_long_one_ends_in_one_line_then_resumes(
  outage_server, tmp_path
):
  """One outage, two runs in it: one with the default budget waits it out, one with a 15 s
  budget ends in one line."""
  env = {**os.environ, **outage_server.settings()}
  local = str(tmp_path / 'unbroken')
  short = _Run(f'gs://{BUCKET}/short', env)
  long = _Run(f'gs://{BUCKET}/long', env, '--config.storage_outage_minutes=0.25')
  # The store goes down once both have saved: the first run just after its first checkpoint
  # (held there, stopped, until the other is as far), the second after its second.
  short.wait_for('step 2/')
  short.process.send_signal(signal.SIGSTOP)
  long.wait_for('step 4/')
  outage_server.stop()
  down = time.monotonic()
  short.process.send_signal(signal.SIGCONT)
  # The unbroken reference, meanwhile: train.py's program, in this process.
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps, config.keep_checkpoints = STEPS, 2, 100
  train_lib.train_and_evaluate(config, local)
  want = digest(local)
  assert want[0] == str(STEPS)

  code, out, err = long.finish()
  fatal = [line for line in err.splitlines() if line.startswith('FATAL')]
  assert code == 1 and len(fatal) == 1 and 'Traceback' not in err, err[-3000:]
  assert fatal[0].startswith(f'FATAL storage gs://{BUCKET} unreachable for '), fatal[0]
  assert 'storage_outage_minutes=0.25' in fatal[0] and 'rerun the same command' in fatal[0]
  # The budget, plus one round of the clients' own retries (gcsfs: about 31 s).
  assert time.monotonic() - down < load.timeout(15 + 90), err[-3000:]
  committed = fatal[0].split('the last committed checkpoint is ')[1].split(':')[0]

  # Down for OUTAGE_S at least: past gcsfs's own retries, so the run's retries cure it.
  time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
  outage_server.start()
  # The same command resumes the ended run (with a larger budget: the field may change on a
  # resume) while the other finishes.
  resumed = _Run(f'gs://{BUCKET}/long', env)
  code, out, err = short.finish()
  assert code == 0, err[-3000:]
  assert 'Traceback' not in err and 'reachable again' in err, err[-3000:]
  code, out, err = resumed.finish()
  assert code == 0, err[-3000:]
  if committed != 'none':
    assert f'resumed from checkpoint at {committed}' in out, out
  assert _digests(env, f'gs://{BUCKET}/short', f'gs://{BUCKET}/long') == [want, want]
