"""Interrupted runs: SIGTERM saves and stops, SIGKILL resumes, and the result is bit-identical."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from halonet import errors
from halonet import sharding
from halonet.data import pipeline as input_pipeline
from halonet.train import checkpointing
from halonet.train import loop as train_lib
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib
from tests import inputs
from tests import load

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 16
# A save every step: an async write is in flight at any moment a kill can hit.
FLAGS = [
  '--config=configs/tiny.py',
  f'--config.num_train_steps={STEPS}',
  '--config.checkpoint_every_steps=1',
]
KILLS = 3
# Batches are read this many steps ahead (device prefetch): the read of batch n + AHEAD happens
# just before step n runs.
AHEAD = sharding.PREFETCH_BATCHES

INTERRUPTED_TRAIN = os.path.join(REPO, 'tests', 'scripts', 'interrupted_train.py')


def _run(args, workdir):
  return subprocess.run(
    [sys.executable, *args, f'--workdir={workdir}', *FLAGS],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
  )


def _interrupt(sig, at_step, workdir, resumed_at):
  return _run([INTERRUPTED_TRAIN, sig, str(at_step), '-', str(resumed_at)], workdir)


def _complete_steps(workdir):
  return ocp.path.step.checkpoint_steps(os.path.join(workdir, 'checkpoints'))


def _final_state(workdir):
  manager = checkpointing.create_manager(workdir, 3, read_only=True)
  assert manager.latest_step() == STEPS
  state = manager.restore(STEPS, args=ocp.args.StandardRestore())
  manager.close()
  return state


def _sigterm_before_step(step: int, monkeypatch) -> None:
  """The train stream sends this process a SIGTERM as the batch of `step` is read."""
  create_split = input_pipeline.create_split

  def terminating(config, split, *, train, **kwargs):
    batches = create_split(config, split, train=train, **kwargs)
    for i, batch in enumerate(batches, 1):
      if train and i == step + AHEAD:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(input_pipeline, 'create_split', terminating)


def test_sigterm_saves_the_step_it_reaches_and_stops_cleanly(tmp_path, monkeypatch, caplog):
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps = 6, 100  # Step 3 is no save step.
  workdir = str(tmp_path / 'run')
  before = signal.getsignal(signal.SIGTERM)
  _sigterm_before_step(3, monkeypatch)
  with caplog.at_level(logging.WARNING):
    result = train_lib.train_and_evaluate(config, workdir)
  assert result['preempted'] and result['step'] == 3
  assert _complete_steps(workdir) == [3]
  assert 'preempted at step 3: checkpoint saved, stopping' in caplog.text
  assert signal.getsignal(signal.SIGTERM) == before  # The caller's handler is back.


@pytest.mark.slow
def test_sigterm_then_sigkill_soak_then_resume_equals_unbroken_run(tmp_path, monkeypatch, capsys):
  """A SIGTERM, then KILLS SIGKILLs at random steps, each while saves are being written (one is
  started every step) and each resumed from the newest complete checkpoint on disk: the final
  parameters are bit-identical to an unbroken run's."""
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps = STEPS, 1
  unbroken = str(tmp_path / 'unbroken')
  train_lib.train_and_evaluate(config, unbroken)

  # SIGTERM just before step 3: step 3 runs, is saved, and the run returns cleanly.
  workdir = str(tmp_path / 'interrupted')
  _sigterm_before_step(3, monkeypatch)
  assert train_lib.train_and_evaluate(config, workdir)['preempted']
  monkeypatch.undo()
  assert max(_complete_steps(workdir)) == 3

  # Each subprocess resumes at the newest complete checkpoint (read here from disk) and is
  # SIGKILLed just before a random step: saves of the steps before it may be half-written.
  rng = np.random.default_rng(0)
  for _ in range(KILLS):
    resumed_at = max(_complete_steps(workdir))
    last = resumed_at + int(rng.integers(1, 4))  # The step the run gets through; < STEPS.
    kill = _interrupt('SIGKILL', last + AHEAD + 1, workdir, resumed_at)
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-3000:]
    assert f'resumed from checkpoint at step {resumed_at}' in kill.stdout

  # A half-written save of a later step (Orbax's tmp name) must be ignored, not restored.
  checkpoints = os.path.join(workdir, 'checkpoints')
  newest = max(_complete_steps(workdir))
  shutil.copytree(
    os.path.join(checkpoints, str(newest)),
    os.path.join(checkpoints, f'{STEPS}.orbax-checkpoint-tmp'),
  )
  capsys.readouterr()
  train_lib.train_and_evaluate(config, workdir)  # train.py's program, in this process.
  done = capsys.readouterr().out
  assert f'resumed from checkpoint at step {newest}' in done
  assert f'step {STEPS}/{STEPS}' in done

  # Same program, same batches (the input position is the step): bit-identical on CPU.
  jax.tree.map(np.testing.assert_array_equal, _final_state(workdir), _final_state(unbroken))


def _recording(read):
  """create_split, noting every train batch it hands out (its first image's bytes), in order."""
  create_split = input_pipeline.create_split

  def recorded(config, split, *, train, **kwargs):
    batches = create_split(config, split, train=train, **kwargs)
    if not train:
      return batches

    def gen():
      for batch in batches:
        read.append(batch['image'][0].tobytes())
        yield batch

    return gen()

  return recorded


@pytest.mark.slow
def test_training_reads_the_stream_from_its_start_and_resumes_at_its_checkpoint(
  tmp_path, monkeypatch
):
  """The input pipeline's own stream from step 0, read here, is the reference: a fresh run reads
  it from batch 0, and a run resumed from step 2 (known here: the only checkpoint left) from
  batch 2 (counting from 0: the batch step 3 trains on). Comparing two runs of the training code
  with each other would miss an offset that both share."""
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps = 4, 2
  stream = [
    batch['image'][0].tobytes()
    for _, batch in zip(
      range(4),
      inputs.create_split(
        config, config.input.train_split, train=True, batch_size=config.batch_size
      ),
    )
  ]
  assert len(set(stream)) == 4  # Distinct batches, so a shifted read cannot match.
  workdir = str(tmp_path)
  fresh, resumed = [], []
  monkeypatch.setattr(input_pipeline, 'create_split', _recording(fresh))
  train_lib.train_and_evaluate(config, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))  # As if it crashed after step 2's.
  monkeypatch.setattr(input_pipeline, 'create_split', _recording(resumed))
  train_lib.train_and_evaluate(config, workdir)
  assert fresh[:4] == stream
  assert resumed[:2] == stream[2:]


def test_half_written_checkpoint_is_never_restored(tmp_path):
  workdir = str(tmp_path)
  manager = checkpointing.create_manager(workdir, 3)
  checkpointing.save(manager, 2, {'w': np.arange(4.0)})
  manager.wait_until_finished()
  manager.close()
  checkpoints = tmp_path / 'checkpoints'
  shutil.copytree(checkpoints / '2', checkpoints / '4.orbax-checkpoint-tmp')
  (checkpoints / '6.orbax-checkpoint-tmp').mkdir()

  reader = checkpointing.create_manager(workdir, 3, read_only=True)  # eval.py's view.
  assert reader.latest_step() == 2
  reader.close()
  writer = checkpointing.create_manager(workdir, 3)  # A resumed run.
  assert writer.latest_step() == 2
  abstract = {'w': jax.ShapeDtypeStruct((4,), np.float64)}
  np.testing.assert_array_equal(
    checkpointing.restore_readable(writer, abstract)[1]['w'], np.arange(4.0)
  )
  # Orbax clears the leftovers in the background and waits for that before the writer's first
  # save (not before close), so they are gone once the resumed run has saved.
  checkpointing.save(writer, 3, {'w': np.arange(4.0) + 1})
  writer.close()
  assert sorted(os.listdir(checkpoints)) == ['2', '3']


def _failing_save_at(step):
  """CheckpointManager.save, failing as Orbax does when TensorStore hits a full disk."""
  save = ocp.CheckpointManager.save

  def failing(manager, at, *args, **kwargs):
    if at == step:
      raise ValueError(
        f'RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database at local '
        f'file "{manager.directory}/{at}.orbax-checkpoint-tmp": No space left on '
        f"device [os_error_code='28']"
      )
    return save(manager, at, *args, **kwargs)

  return failing


def test_full_disk_names_the_last_complete_checkpoint_and_resumes_from_it(
  tmp_path, monkeypatch, capsys
):
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps = 6, 1
  monkeypatch.setattr(ocp.CheckpointManager, 'save', _failing_save_at(4))
  with pytest.raises(errors.DiskFull) as error:
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert 'disk full' in str(error.value) and 'last complete checkpoint is step 3' in str(
    error.value
  )
  monkeypatch.undo()
  assert train_lib.train_and_evaluate(config, str(tmp_path))['step'] == 6
  assert 'resumed from checkpoint at step 3' in capsys.readouterr().out


@pytest.mark.slow
def test_real_full_disk_then_resume_after_space_is_freed(tmp_path):
  """On a 1.5 MB tmpfs (where this machine lets the test mount one): train.py stops in one line
  naming the last complete checkpoint, and once the disk is larger resumes from exactly it."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mount = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', 'size=1536k', 'tmpfs', str(disk)], capture_output=True, text=True
  )
  if mount.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mount.stderr.strip()}')
  try:
    workdir = disk / 'run'
    command = [
      sys.executable,
      'train.py',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      '--config.num_train_steps=12',
      '--config.checkpoint_every_steps=1',
      '--config.keep_checkpoints=100',
    ]
    run = lambda: subprocess.run(
      command, cwd=REPO, capture_output=True, text=True, timeout=load.timeout(300)
    )
    full = run()
    fatal = [line for line in full.stderr.splitlines() if line.startswith('FATAL')]
    complete = ocp.path.step.checkpoint_steps(workdir / 'checkpoints')
    # One line, not Orbax's writer threads' tracebacks around it.
    assert full.returncode == 1 and len(fatal) == 1 and 'Traceback' not in full.stderr, (
      full.stderr[:3000] + '\n...\n' + full.stderr[-3000:]
    )
    assert 'disk full' in fatal[0]
    last = f'step {max(complete)}' if complete else 'none'
    assert f'last complete checkpoint is {last}' in fatal[0]
    subprocess.run(['mount', '-o', 'remount,size=64m', str(disk)], check=True)
    resumed = run()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if complete:
      assert f'resumed from checkpoint at step {max(complete)}' in resumed.stdout
  finally:
    subprocess.run(['umount', str(disk)], capture_output=True)


def test_a_run_off_the_main_thread_leaves_signal_handlers_alone():
  """Python sets signal handlers on the main thread only: a run started from another thread (a
  notebook's, a launcher's) relies on Orbax's preemption check instead of failing."""
  failures = []

  def start_and_stop():
    try:
      train_lib.Preemption().close()
    except Exception as e:  # pylint: disable=broad-except
      failures.append(e)

  before = signal.getsignal(signal.SIGTERM)
  thread = threading.Thread(target=start_and_stop)
  thread.start()
  thread.join(timeout=60)
  assert not failures and signal.getsignal(signal.SIGTERM) == before


def _step_zero_run(workdir, config, seed):
  """A workdir as `convert.py` leaves it: config.json and one checkpoint, step 0, holding the
  state initialised from `seed` (not config.seed, so a fresh start is told apart from a resume)."""
  mesh = sharding.create_mesh(config.mesh_shape)
  model, tx, _, _ = train_step_lib.build(config, 1)
  init, _ = train_step_lib.abstract_train_state(config, model, tx, mesh)
  state = jax.jit(init)(jax.random.key(seed))
  workdir_lib.check_and_store_config(config, workdir, False, 0)
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  checkpointing.save(manager, 0, state)
  checkpointing.finish(manager)
  return state


def _max_distance(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_workdir_whose_only_checkpoint_is_step_0_resumes_from_it(tmp_path, capsys):
  """Step 0 is a checkpoint like any other (Python's falsy 0 must not read as 'none'): the run
  starts from its parameters, not from a fresh initialisation."""
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps = 1, 1
  config.eval_every_steps = 1
  workdir = str(tmp_path)
  saved = _step_zero_run(workdir, config, seed=config.seed + 1)
  fresh = _step_zero_run(str(tmp_path / 'fresh'), config, seed=config.seed)
  train_lib.train_and_evaluate(config, workdir)
  assert 'resumed from checkpoint at step 0' in capsys.readouterr().out
  manager = checkpointing.create_manager(workdir, 3, read_only=True)
  trained = manager.restore(1, args=ocp.args.StandardRestore())
  manager.close()
  # One small step away from the saved parameters, a whole initialisation away from fresh ones.
  assert _max_distance(trained['params'], saved.params) < 0.1
  assert _max_distance(trained['params'], fresh.params) > 0.3


def test_an_explicitly_requested_step_0_is_restored(tmp_path):
  config = tiny.get_config()
  saved = _step_zero_run(str(tmp_path), config, seed=7)
  mesh = sharding.create_mesh(config.mesh_shape)
  state, _, _ = train_step_lib.restore_run(config, str(tmp_path), mesh, step=0)
  assert int(state.step) == 0 and _max_distance(state.params, saved.params) == 0
