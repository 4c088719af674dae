"""The multi-host flags as they reach jax.distributed.initialize (halonet/train/launch.py), in
this process: each one given is passed on, process 0 and a lone flag included, and none is
invented; without --distributed nothing is initialised. A command's exit through launch.run."""

import os
import subprocess
import sys

from absl import flags
import jax
import pytest

from halonet.train import launch
from tests import load

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
if 'workdir' not in FLAGS:  # Once per test process, as train.py defines them.
  launch.define_flags('the workdir')


@pytest.fixture
def parsed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))

  def parse(*args):
    FLAGS.unparse_flags()
    FLAGS(['train.py', '--config=configs/tiny.py', '--workdir=/tmp/unused', *args])
    launch.start(['train.py'])
    return calls

  yield parse
  FLAGS.unparse_flags()


@pytest.mark.parametrize(
  'args, passed',
  [
    (['--distributed'], {}),  # A TPU pod or SLURM: JAX detects all three.
    (
      [
        '--distributed',
        '--coordinator_address=127.0.0.1:1234',
        '--num_processes=2',
        '--process_id=0',
      ],
      {'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 0},
    ),
    (['--distributed', '--process_id=0'], {'process_id': 0}),  # 0 is a process id, not unset.
    (['--distributed', '--process_id=1'], {'process_id': 1}),
    (['--distributed', '--num_processes=4'], {'num_processes': 4}),
    (
      ['--distributed', '--coordinator_address=127.0.0.2:8476'],
      {'coordinator_address': '127.0.0.2:8476'},
    ),
  ],
)
def test_the_cluster_flags_given_reach_initialize_as_given(parsed, args, passed):
  assert parsed(*args) == [passed]


def test_without_distributed_nothing_is_initialised(parsed):
  assert parsed() == []
  with pytest.raises(SystemExit, match='--process_id given without --distributed'):
    parsed('--process_id=0')


# A command's main that makes as many long-lived objects as the imports of TensorFlow, JAX and
# Flax (and says how many full collections that set off), then leaves a reference cycle alive at
# exit, an atexit handler and unflushed output.
COMMAND = """
import atexit
import gc
import sys

from absl import app
from halonet.train import launch


class Cycle:
  def __init__(self):
    self.itself = self

  def __del__(self):
    print('cycle collected')


def main(argv):
  global imported, kept
  full = []
  gc.callbacks.append(lambda phase, info: full.append(phase) if info['generation'] == 2 else None)
  imported = [[i] for i in range(600_000)]
  gc.callbacks.pop()
  print(f'{full.count("start")} full collections')
  kept = Cycle()
  atexit.register(print, 'atexit handler ran')
  print('unflushed output', end='')


(launch.run if sys.argv[1] == 'launch' else app.run)(main)
"""


@pytest.mark.parametrize('runner', ['launch', 'absl'])
def test_a_command_imports_and_ends_without_full_collections_and_with_the_rest_of_its_exit(
  runner, tmp_path
):
  """launch.run makes no full collection while a command's imports make their objects, and
  leaves cycles alive at exit to the OS (CPython's final collections would walk every object of
  TensorFlow, JAX and Flax to free them); the rest of the exit is absl's."""
  script = tmp_path / 'command.py'
  script.write_text(COMMAND)
  done = subprocess.run(
    [sys.executable, str(script), runner],
    cwd=REPO,
    env={**os.environ, 'PYTHONPATH': REPO},
    capture_output=True,
    text=True,
    timeout=load.timeout(60),
  )
  assert done.returncode == 0, done.stderr[-2000:]
  first, rest = done.stdout.split('\n', 1)
  collections = int(first.split()[0])
  assert collections >= 3 if runner == 'absl' else collections == 0, first
  collected = '\ncycle collected\n' if runner == 'absl' else '\n'
  assert rest == f'unflushed outputatexit handler ran{collected}', done.stdout
