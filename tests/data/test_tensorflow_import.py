"""TensorFlow's C++ start-up notices stay off stderr; everything else written there still shows."""

import os
import subprocess
import sys

from halonet.data import tensorflow_import
from tests import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_only_the_known_notices_are_held_back(capfd):
  with tensorflow_import._native_stderr_filtered():  # pylint: disable=protected-access
    for line in (
      tensorflow_import.NOTICES[0],
      'E0000 a real error',
      'I0000 port.cc:153] ' + tensorflow_import.NOTICES[1] + ' You may see ...',
    ):
      os.write(2, (line + '\n').encode())
  assert capfd.readouterr().err == 'E0000 a real error\n'


def test_importing_the_input_pipeline_writes_nothing_to_stderr():
  done = subprocess.run(
    [sys.executable, '-c', 'import halonet.data.pipeline, halonet.tools.trained'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
    env={k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'},
  )
  assert done.returncode == 0 and done.stderr == '', done.stderr
