"""Two real JAX processes x 2 CPU devices on 127.0.0.1, as a multi-host run is launched."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from halonet import paths
from halonet import sharding
from halonet.attention import measure
from halonet.detection import evaluation as detection_evaluation
from halonet.models import networks
from halonet.train import checkpointing
from halonet.train import evaluation as eval_lib
from halonet.train import step as train_step_lib
from tests import compile_flags
from tests import inputs
from tests import load
from tests import loopback
from tests.detection import toy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROCESSES, DEVICES_PER_PROCESS = 2, 2
# Per run of both processes; every child is killed past it or on any failure.
TIMEOUT_S = load.timeout(300)


def _run_processes(
  workdir, cache, flags=('--config=configs/tiny.py',)
) -> tuple[list[int], list[str]]:
  """train.py --distributed `flags` in PROCESSES processes; their pids and outputs once all
  exited 0.

  'auto' attention is measured (on CPU only when asked), so that process 0's choice must reach
  process 1; `cache` is the measurements' cache folder."""
  port = loopback.free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    HALONET_MEASURE_ATTENTION='1',
    HALONET_CACHE=cache,
    PYTHONFAULTHANDLER='1',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}'
    f' {compile_flags.FAST_COMPILE}',
  )
  children = [
    subprocess.Popen(
      [
        sys.executable,
        'train.py',
        '--distributed',
        f'--coordinator_address=127.0.0.1:{port}',
        f'--num_processes={PROCESSES}',
        f'--process_id={i}',
        *flags,
        f'--workdir={workdir}',
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )
    for i in range(PROCESSES)
  ]
  try:
    try:
      outputs = [child.communicate(timeout=TIMEOUT_S)[0] for child in children]
    except subprocess.TimeoutExpired:
      # A stall: each process still running prints every thread's Python stack (faulthandler,
      # on SIGABRT) and the failure shows where it waits.
      stuck = [i for i, child in enumerate(children) if child.poll() is None]
      for i in stuck:
        os.killpg(children[i].pid, signal.SIGABRT)
      tails = [child.communicate(timeout=60)[0][-6000:] for child in children]
      raise AssertionError(
        f'processes {stuck} still running after {TIMEOUT_S:.0f} s; their output and stacks:\n'
        + '\n'.join(f'--- process {i}:\n{tail}' for i, tail in enumerate(tails))
      ) from None
  finally:
    for child in children:
      if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
  for i, (child, output) in enumerate(zip(children, outputs)):
    assert child.returncode == 0, f'process {i} exited {child.returncode}:\n{output[-3000:]}'
  return [child.pid for child in children], outputs


def _restored(workdir, abstract, step):
  """The run's checkpoint, restored by this one process onto its own devices."""
  manager = checkpointing.create_manager(workdir, 3, read_only=True)
  assert manager.latest_step() == step
  state = checkpointing.restore_readable(manager, abstract, step)[1]
  manager.close()
  return jax.device_get(state)


def _one_process_run(config):
  """The same training in this process on a mesh of the same size, fed the global batches the
  two processes assemble: process 0's examples first, then process 1's."""
  sizes = train_step_lib.split_sizes(config)
  model, tx, schedule, num_steps = train_step_lib.build(config, sizes[config.input.train_split])
  mesh = sharding.create_mesh(config.mesh_shape, jax.devices()[: PROCESSES * DEVICES_PER_PROCESS])
  init, abstract = train_step_lib.abstract_train_state(config, model, tx, mesh)
  shardings = train_step_lib.shardings_of(abstract)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
  initial = jax.device_get(state)
  step = train_step_lib.make_train_step(config, model, tx, schedule, mesh, shardings)
  streams = [
    inputs.create_split(
      config,
      config.input.train_split,
      train=True,
      batch_size=config.batch_size // PROCESSES,
      split_size=sizes[config.input.train_split],
      process_index=i,
      process_count=PROCESSES,
    )
    for i in range(PROCESSES)
  ]
  for _, *parts in zip(range(num_steps), *streams):
    batch = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    state, _ = step(state, sharding.shard_batch(batch, mesh))
  return initial, jax.device_get(state), abstract, num_steps


def _one_process_eval(config, state, abstract, workdir):
  """The checkpoint's evaluation by this one process on a mesh of the same size, with the
  attention forms the run recorded: every split's top-1, top-5, loss and count."""
  mesh = sharding.create_mesh(config.mesh_shape, jax.devices()[: PROCESSES * DEVICES_PER_PROCESS])
  model = networks.create_model(config, measured=measure.recorded_choice(workdir) or ())
  shapes = {'params': abstract.params, 'batch_stats': abstract.batch_stats}
  eval_fn, _ = eval_lib.compile_eval_step(model, mesh, shapes, config)
  variables = jax.device_put(
    {'params': state.params, 'batch_stats': state.batch_stats}, sharding.replicated(mesh)
  )
  sizes = train_step_lib.split_sizes(config, train=False)
  return {
    split: eval_lib.evaluate(eval_fn, variables, config, split, sizes[split], mesh)
    for split in config.input.eval_splits
  }


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(tree))))


@pytest.mark.slow
def test_two_processes_train_like_one_and_only_process_0_writes(tmp_path, storage_server):
  # The second run writes into a bucket (conftest.storage_server), as a pod run would.
  runs = [tmp_path / 'run_a', f'{storage_server}/multiprocess/run_b']
  cache = str(tmp_path / 'cache')
  pids, outputs = _run_processes(runs[0], cache)
  # Both processes use the forms process 0 measured, and the run records them.
  chosen = [re.findall(r'attention forms chosen on process 0 .*', out) for out in outputs]
  assert len(chosen[0]) == 1 and chosen[0] == chosen[1], outputs[1][-2000:]
  assert (runs[0] / 'attention_choice.json').exists()

  # Only process 0 wrote the results and TensorBoard events (the event file names its pid).
  events = [name for name in os.listdir(runs[0]) if name.startswith('events.out.tfevents')]
  assert len(events) == 1 and re.search(rf'\.{pids[0]}\.', events[0]), (events, pids)
  assert (runs[0] / 'results.json').exists()

  config = tiny.get_config()
  initial, want, abstract, steps = _one_process_run(config)
  got = _restored(runs[0], abstract, steps)
  # Collectives across processes sum in another order than within one, so the two differ by
  # float rounding, which training amplifies: compare the difference with the change training
  # made (a process reading another's examples makes them differ by about as much as it).
  for key in ('params', 'batch_stats'):
    difference = _norm(jax.tree.map(np.subtract, getattr(got, key), getattr(want, key)))
    change = _norm(jax.tree.map(np.subtract, getattr(want, key), getattr(initial, key)))
    assert difference < 1e-2 * change, (key, difference, change)

  # The run's final evaluation, each process reading its own share of the eval split, against
  # this one process evaluating the same checkpoint: the same examples, each counted once.
  two = json.loads((runs[0] / 'results.json').read_text())['raw_eval']
  one = _one_process_eval(config, got, abstract, runs[0])
  assert sorted(one) == sorted(two) == sorted(config.input.eval_splits)
  for split, result in one.items():
    for key in ('count', 'top1', 'top5'):
      assert result[key] == two[split][key], (split, key, result, two[split])
    np.testing.assert_allclose(result['loss'], two[split]['loss'], rtol=1e-5)

  pids, _ = _run_processes(runs[1], cache)
  again = _restored(runs[1], abstract, steps)
  jax.tree.map(np.testing.assert_array_equal, again, got)
  in_bucket = [name.rsplit('/', 1)[-1] for name in paths.files_under(runs[1])]
  events = [name for name in in_bucket if name.startswith('events.out.tfevents')]
  assert events and all(re.search(rf'\.{pids[0]}\.', name) for name in events), (events, pids)
  assert {'config.json', 'results.json'} <= set(in_bucket)


@pytest.mark.slow
def test_two_processes_score_a_detection_run_as_one_does(tmp_path):
  """Each process reads its own share of every train and eval batch; the detections of all of
  them are gathered and scored once: every test scene is counted once, and the scores are what
  one process gives the same checkpoint."""
  workdir = tmp_path / 'detection'
  _run_processes(workdir, str(tmp_path / 'cache'), toy.run_flags())
  two = json.loads((workdir / 'results.json').read_text())['eval']['test']
  one = detection_evaluation.evaluate_checkpoint(toy.run_config(), str(workdir))['eval']['test']
  assert two['count'] == one['count'] == 500
  for kind in ('bbox', 'segm'):
    names = sorted(one[kind])
    np.testing.assert_allclose(
      [two[kind][n] for n in names], [one[kind][n] for n in names], atol=0.2
    )
