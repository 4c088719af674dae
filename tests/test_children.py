"""Every child a test starts ends with the test runner, however the runner ends (conftest.py
starts them through scripts/die_with_parent.py): a SIGKILLed pytest leaves no storage server or
training running."""

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split()[2] != 'Z'  # A zombie has ended, awaiting its parent's wait.
  except FileNotFoundError:
    return False


def test_a_sigkilled_runner_takes_its_tests_children_with_it(tmp_path):
  pid_file = tmp_path / 'child.pid'
  (tmp_path / 'test_sleeper.py').write_text(
    'import subprocess, sys, time\n'
    'def test_sleeps():\n'
    "  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    f'  open({str(pid_file)!r}, "w").write(str(child.pid))\n'
    '  time.sleep(600)\n'
  )
  runner = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'pytest',
      '-q',
      '-p',
      'tests.conftest',
      '-o',
      'addopts=',
      str(tmp_path / 'test_sleeper.py'),
    ],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
      assert time.monotonic() < deadline and runner.poll() is None, 'the test never started'
      time.sleep(0.1)
    child = int(pid_file.read_text())
    assert _alive(child)
  finally:
    runner.send_signal(signal.SIGKILL)
    runner.wait()
  deadline = time.monotonic() + 30
  while _alive(child) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _alive(child)
