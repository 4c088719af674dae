"""The multi-host flags as they reach jax.distributed.initialize (halonet/train/launch.py), in
this process: each one given is passed on, process 0 and a lone flag included, and none is
invented; without --distributed nothing is initialised."""

from absl import flags
import jax
import pytest

from halonet.train import launch

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
