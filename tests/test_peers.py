"""What every process of a multi-host run needs from process 0 (sharding.broadcast_json): the
value arrives, and a wait for a process 0 that never publishes ends in one line naming what was
waited for, within its bound, instead of hanging the job. Two real processes on 127.0.0.1."""

import os
import subprocess
import sys

from tests import load
from tests import loopback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'tests', 'scripts', 'peer_timeout.py')


def test_a_process_waiting_for_process_0_gives_up_in_one_line_naming_what():
  port = str(loopback.free_port())
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  procs = [
    subprocess.Popen(
      [sys.executable, SCRIPT, port, str(i)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=load.timeout(120))[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  lines = outputs[1].strip().splitlines()
  assert lines[0] == "got {'from': 0}", outputs
  assert lines[1].startswith('process 1 waited 3 s for process 0 to publish the second value')
  assert 'process 0 stalled or died' in lines[1]
