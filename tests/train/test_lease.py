"""One run per workdir (halonet/train/lease.py): a second run stops in one line naming the owner
before it writes anything; a dead run's lease is taken over with a line; locally and on the
Cloud Storage API server on 127.0.0.1."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from halonet import errors
from halonet import paths
from halonet.train import checkpointing
from halonet.train import lease
from halonet.train import loop as train_lib
from tests import load

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = load.timeout(600)


@pytest.fixture(params=['local', 'bucket'])
def workdir(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'run')
  server = request.getfixturevalue('storage_server')
  return f'{server}/leases/{request.node.name.replace("[", "_").replace("]", "")}'


def test_a_second_run_is_refused_naming_the_owner_until_the_first_releases(workdir):
  first = lease.acquire(workdir)
  with pytest.raises(errors.ConfigError) as refused:
    lease.acquire(workdir)
  message = str(refused.value)
  assert f'in use by the run of pid {os.getpid()} on {socket.gethostname()}' in message
  assert '\n' not in message and 'train in another workdir' in message
  beside = lease.acquire(f'{workdir}_beside')  # Another workdir, meanwhile: its own lease.
  beside.release()
  first.release()
  assert not (paths.path(workdir) / lease.LEASE).exists()
  lease.acquire(workdir).release()  # Free again.


def test_the_lease_is_created_by_one_of_many_at_once(workdir):
  """The store decides: of eight processes creating it together, exactly one holds it."""
  code = (
    'import sys\n'
    'from halonet import errors\n'
    'from halonet.train import lease\n'
    'try:\n'
    '  lease.acquire(sys.argv[1], say=lambda line: None)\n'
    '  print("held")\n'
    'except errors.ConfigError:\n'
    '  print("refused")\n'
  )
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', code, workdir], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    for _ in range(8)
  ]
  outcomes = sorted(p.communicate(timeout=TIMEOUT_S)[0].strip() for p in procs)
  assert outcomes == ['held'] + ['refused'] * 7, outcomes


def test_a_sigkilled_runs_lease_is_taken_over_at_once_on_its_host(tmp_path):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time\nfrom halonet.train import lease\n'
      'lease.acquire(sys.argv[1])\nprint("held", flush=True)\ntime.sleep(600)\n',
      workdir,
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(errors.ConfigError, match=f'pid {holder.pid}'):
      lease.acquire(workdir)  # Alive: refused.
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  lines = []
  taken = lease.acquire(workdir, say=lines.append)
  assert lines == [
    'took over the lease of a run that ended without releasing it '
    f'(pid {holder.pid} on {socket.gethostname()}: its process is gone)'
  ]
  taken.release()


def _held_elsewhere(workdir: str, renewed: float) -> None:
  record = {'host': 'another-host', 'pid': 1, 'started': 0.0, 'renewed': renewed, 'token': 'x'}
  paths.write_bytes(paths.path(workdir) / lease.LEASE, json.dumps(record).encode())


def test_another_hosts_lease_is_taken_over_once_not_renewed_for_the_stated_time(workdir):
  now = 1_000_000.0
  _held_elsewhere(workdir, renewed=now - lease.STALE_S + 10)
  with pytest.raises(errors.ConfigError, match=r'pid 1 on another-host \(renewed 290 s ago\)'):
    lease.acquire(workdir, clock=lambda: now)
  _held_elsewhere(workdir, renewed=now - lease.STALE_S - 1)
  lines = []
  taken = lease.acquire(workdir, say=lines.append, clock=lambda: now)
  assert lines[0].endswith('(pid 1 on another-host: not renewed for 301 s)')
  assert paths.read_json(paths.path(workdir) / lease.LEASE)['pid'] == os.getpid()
  taken.release()


def test_a_held_lease_is_renewed_while_the_run_lives(tmp_path, monkeypatch):
  monkeypatch.setattr(lease, 'RENEW_S', 0.01)
  times = iter(range(100, 10_000))
  held = lease.acquire(str(tmp_path), clock=lambda: float(next(times)))
  target = tmp_path / lease.LEASE
  first = json.loads(target.read_text())['renewed']
  deadline = time.monotonic() + 30
  while json.loads(target.read_text())['renewed'] == first and time.monotonic() < deadline:
    time.sleep(0.01)
  assert json.loads(target.read_text())['renewed'] > first
  held.release()
  assert not target.exists()


def test_a_process_is_alive_while_it_runs_and_is_not_signalled_by_the_look():
  # SIGHUP at its default (a nohup'd runner's children ignore it): any signal would end it.
  script = (
    'import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); '
    "print('ready', flush=True); time.sleep(60)"
  )
  child = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline() == 'ready\n'  # Its handlers are set.
    assert lease._pid_alive(child.pid)  # pylint: disable=protected-access
    time.sleep(0.2)
    assert child.poll() is None  # Looked at, not signalled.
  finally:
    child.kill()
    child.wait()
  assert not lease._pid_alive(child.pid)  # pylint: disable=protected-access


def test_processes_other_than_0_hold_no_lease_and_write_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(lease.jax, 'process_index', lambda: 1)
  assert lease.acquire(str(tmp_path / 'run')) is None
  assert not (tmp_path / 'run').exists()


def test_a_stale_lease_taken_by_another_run_first_is_left_to_it(tmp_path, monkeypatch):
  """Two runs find the same stale lease; the other replaces it first: this one re-reads it just
  before removing it, sees the new owner's, and is refused naming that owner."""
  workdir = str(tmp_path)
  now = 1_000_000.0
  _held_elsewhere(workdir, renewed=now - lease.STALE_S - 1)
  read_json, reads = paths.read_json, []

  def racing_read(target):
    reads.append(target)
    if len(reads) == 2:  # The other run takes the lease between this run's two looks.
      fresh = {'host': 'third-host', 'pid': 7, 'started': now, 'renewed': now, 'token': 'y'}
      paths.write_bytes(target, json.dumps(fresh).encode())
    return read_json(target)

  monkeypatch.setattr(lease.paths, 'read_json', racing_read)
  with pytest.raises(errors.ConfigError, match=r'in use by the run of pid 7 on third-host'):
    lease.acquire(workdir, say=lambda _: None, clock=lambda: now)
  assert read_json(paths.path(workdir) / lease.LEASE)['host'] == 'third-host'


def test_a_stale_lease_removed_by_another_run_first_is_taken(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  now = 1_000_000.0
  _held_elsewhere(workdir, renewed=now - lease.STALE_S - 1)
  read_json, reads = paths.read_json, []

  def vanishing_read(target):
    reads.append(target)
    if len(reads) == 2:  # The other run removes it between this run's two looks.
      paths.path(target).unlink()
    return read_json(target)

  monkeypatch.setattr(lease.paths, 'read_json', vanishing_read)
  taken = lease.acquire(workdir, say=lambda _: None, clock=lambda: now)
  assert read_json(paths.path(workdir) / lease.LEASE)['pid'] == os.getpid()
  taken.release()


@pytest.mark.parametrize('outage', [False, True])
def test_a_failed_renewal_is_said_unless_the_store_is_declared_out(tmp_path, monkeypatch, outage):
  """During a declared outage the run ends saying why in one line; the lease stays silent."""
  monkeypatch.setattr(lease, 'RENEW_S', 0.01)
  monkeypatch.setattr(lease.storage, 'outage_declared', lambda: outage)
  warnings = []
  monkeypatch.setattr(lease.logging, 'warning', lambda *args: warnings.append(args))
  held = lease.acquire(str(tmp_path), say=lambda _: None)

  def failing_renew():
    raise OSError('the store is unreachable')

  monkeypatch.setattr(held, 'renew', failing_renew)
  time.sleep(0.3)
  held.release()
  said = [args for args in warnings if 'renewing the lease' in args[0]]
  assert bool(said) is not outage, warnings


STEPS = 8


def _train(workdir: str) -> subprocess.Popen:
  return subprocess.Popen(
    [
      sys.executable,
      'train.py',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      f'--config.num_train_steps={STEPS}',
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _final_params(workdir: str) -> list[np.ndarray]:
  manager = checkpointing.create_manager(workdir, 3, read_only=True)
  state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  manager.close()
  return [np.asarray(x) for x in jax.tree.leaves(state['params'])]


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory):
  """The run's final parameters when it trains alone (here: the same program as train.py's)."""
  config = tiny.get_config()
  config.num_train_steps = STEPS
  workdir = str(tmp_path_factory.mktemp('alone'))
  train_lib.train_and_evaluate(config, workdir)
  return _final_params(workdir)


@pytest.mark.slow
def test_the_same_command_started_twice_trains_once_and_equals_an_unbroken_run(workdir, unbroken):
  both = [_train(workdir), _train(workdir)]
  done = [(p.wait(timeout=TIMEOUT_S), *p.communicate()) for p in both]
  codes = sorted(code for code, _, _ in done)
  assert codes == [0, 1], [err[-2000:] for _, _, err in done]
  refused = next(err for code, _, err in done if code == 1)
  assert refused.strip().splitlines()[-1].startswith('FATAL ')
  assert 'the workdir is in use by the run of pid' in refused.strip().splitlines()[-1]
  for got, want in zip(_final_params(workdir), unbroken, strict=True):
    np.testing.assert_array_equal(got, want)
  assert not (paths.path(workdir) / lease.LEASE).exists()  # Released at the end.
