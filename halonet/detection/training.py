"""A detection run (config.task='detection'): Mask R-CNN trained over a backbone of this codebase
with the classification run's machinery (one run per workdir, config.json, Orbax checkpoints,
resume, preemption, progress lines, TensorBoard, results.json), evaluated by COCO's AP at every
eval_every_steps and at the end.

With config.init_from the backbone starts from a classification run's workdir (a train.py run,
or timm's weights converted by convert.py): its parameters and BatchNorm statistics; the heads
start fresh.
"""

from collections.abc import Callable, Iterator
import dataclasses
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from halonet import console
from halonet import errors
from halonet import paths
from halonet import sharding
from halonet import storage
from halonet.attention import measure
from halonet.detection import checks
from halonet.detection import data as data_lib
from halonet.detection import evaluation
from halonet.detection import train_step as step_lib
from halonet.models import networks
from halonet.train import checkpointing
from halonet.train import event_writer
from halonet.train import finetune
from halonet.train import lease as lease_lib
from halonet.train import loop as loop_lib
from halonet.train import optim
from halonet.train import progress
from halonet.train import setup as setup_lib
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib


@dataclasses.dataclass
class _Run:
  """What the loop needs, made once: the steps compiled, the state on the mesh, the batches
  starting at `start_step`."""

  config: ml_collections.ConfigDict
  workdir: str
  manager: ocp.CheckpointManager
  mesh: jax.sharding.Mesh
  state: train_step_lib.TrainState
  batches: Iterator[dict[str, jax.Array]]
  step_fn: Callable[..., Any]
  infer: Callable[..., Any]
  start_step: int
  num_steps: int
  results: dict[str, Any]


# The window's means a progress line prints after the loss, and TensorBoard's train/ scalars.
SHOWN = {name: '.3f' for name in step_lib.LOSSES}


def _backbone_source(
  config: ml_collections.ConfigDict, workdir: str, abstract: train_step_lib.TrainState
) -> tuple[str, int | None, ml_collections.ConfigDict, dict[str, Any]]:
  """config.init_from's (workdir, step, config, reinitialised classifier parameters), checked:
  a classification run whose network has this backbone's shapes."""
  source_dir, source_step, source_config = finetune.source_run(config, workdir)
  if source_config.task != 'classification':
    raise errors.ConfigError(
      f'config.init_from={config.init_from!r} is a {source_config.task} run; a detection run '
      'starts its backbone from a classification run'
    )
  changed = finetune.reinitialised(
    abstract.params['backbone'], networks.abstract_variables(source_config)['params']
  )
  return source_dir, source_step, source_config, changed


def _with_backbone(
  state: train_step_lib.TrainState,
  mesh: jax.sharding.Mesh,
  source: tuple[str, int | None, ml_collections.ConfigDict, dict[str, Any]],
) -> train_step_lib.TrainState:
  """The fresh `state` with the source run's backbone parameters and BatchNorm statistics."""
  source_dir, source_step, source_config, changed = source
  restored, _, _ = train_step_lib.restore_run(source_config, source_dir, mesh, source_step)
  backbone = finetune.start_from(state.params['backbone'], restored.params, changed)
  console.say(f'backbone initialised from {source_dir} step {int(restored.step)}')
  return state.replace(
    params={**state.params, 'backbone': backbone}, batch_stats=restored.batch_stats
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains (resuming from workdir's newest checkpoint if it has one) and returns the results
  (also in workdir/results.json); the same command on a finished run changes nothing."""
  checks.validate_config(config)
  storage.set_budget(60 * config.storage_outage_minutes)
  train_images = data_lib.source(config, config.input.train_split, train=True)
  for split in config.input.eval_splits:  # A missing split is named before anything compiles.
    data_lib.source(config, split, train=False)
  paths.check_writable(workdir, 'workdir')
  stored = workdir_lib.stored_config(workdir)
  lease = lease_lib.acquire(workdir, say=console.say)
  try:
    return _train(config, workdir, allow_config_change, train_images, stored)
  finally:
    if lease is not None:
      lease.release()


def _train(
  config: ml_collections.ConfigDict,
  workdir: str,
  allow_config_change: bool,
  train_images: data_lib.Source,
  stored: dict | None,
) -> dict[str, Any]:
  """train_and_evaluate's work once the workdir's lease is held."""
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  latest = manager.latest_step()  # None, not 0, means nothing to resume.
  resuming = latest is not None
  start_step = latest if resuming else 0
  previous = workdir_lib.read_results(workdir)
  num_steps = train_step_lib.total_train_steps(config, len(train_images))
  if setup_lib.is_finished(config, stored, start_step, num_steps, previous):
    manager.close()
    console.say(f'{workdir} already finished at step {start_step}; its results.json is unchanged')
    return previous
  steps_per_epoch = max(len(train_images) // config.batch_size, 1)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch, num_steps)
  tx = optim.create_optimizer(config, schedule)
  mesh = sharding.create_mesh(config.mesh_shape)
  detector = evaluation.detector_of(config)
  init, abstract = step_lib.abstract_state(config, detector, tx, mesh)
  source = None
  if config.init_from and not resuming:
    source = _backbone_source(config, workdir, abstract)
  start_step, state = checkpointing.resume(
    manager, abstract, workdir, advice='train it in a new workdir', say=console.say
  )
  resuming = state is not None
  workdir_lib.check_and_store_config(config, workdir, allow_config_change, start_step)
  logging.info('config:\n%s', config)
  console.say(
    f'{jax.device_count()} {jax.default_backend()} devices in {jax.process_count()} '
    f'process(es), mesh {dict(mesh.shape)}; compute dtype {detector.heads.dtype}'
  )
  measured = measure.for_run(
    detector.backbone,
    config.model.attention_impl,
    config.image_size,
    config.batch_size // mesh.shape['data'],
    workdir,
    say=console.say,
    mesh_shape=dict(mesh.shape),
  )
  if measured:
    backbone = detector.backbone.clone(
      attention=detector.backbone.attention.with_measured(measured)
    )
    detector = step_lib.Detector(backbone, detector.heads)
  shardings = train_step_lib.shardings_of(abstract)
  if resuming:
    console.say(f'resumed from checkpoint at step {start_step}')
  else:
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
    if source is not None:
      state = _with_backbone(state, mesh, source)
  counts = {k: networks.param_count(v) for k, v in abstract.params.items()}
  console.say(
    f'{sum(counts.values()):,} parameters ({counts["backbone"]:,} in the backbone), '
    f'{num_steps} train steps'
  )
  batches = sharding.prefetch_to_device(
    (
      {k: batch[k] for k in step_lib.TRAIN_BATCH_KEYS}
      for batch in data_lib.train_batches(
        config,
        train_images,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
    ),
    mesh,
  )
  compile_start = time.perf_counter()
  step_fn = (
    step_lib.make_train_step(config, detector, tx, schedule, mesh, shardings)
    .lower(abstract, step_lib.train_batch_specs(config))
    .compile()
  )
  compile_seconds = {'train_step': time.perf_counter() - compile_start}
  infer, compile_seconds['infer'] = evaluation.compile_infer(config, detector, mesh, abstract)
  console.say(
    f'compiled in {compile_seconds["train_step"]:.1f} s (train step) + '
    f'{compile_seconds["infer"]:.1f} s (inference)'
  )
  return _loop(
    _Run(
      config=config,
      workdir=workdir,
      manager=manager,
      mesh=mesh,
      state=state,
      batches=batches,
      step_fn=step_fn,
      infer=infer,
      start_step=start_step,
      num_steps=num_steps,
      results={
        'step': start_step,
        'num_params': sum(counts.values()),
        'compile_seconds': compile_seconds,
        'train_images_per_sec': previous.get('train_images_per_sec'),
      },
    )
  )


def _loop(run: _Run) -> dict[str, Any]:
  """Runs the steps from run.start_step to run.num_steps, saving and evaluating as loop.due
  says; returns the results (also in results.json)."""
  config, workdir, manager, mesh, state = run.config, run.workdir, run.manager, run.mesh, run.state
  num_steps, results = run.num_steps, run.results
  writer = event_writer.create(workdir, just_logging=jax.process_index() > 0)
  preemption = loop_lib.Preemption()

  def last_good() -> str:
    latest = manager.latest_step()
    return 'no checkpoint was saved' if latest is None else f'last good checkpoint is step {latest}'

  metrics = loop_lib.TrainMetrics(last_good, ('loss', *step_lib.LOSSES, 'grad_norm'))
  report = progress.ProgressReport(
    num_steps=num_steps,
    batch_size=config.batch_size,
    every_steps=config.log_every_steps,
    writer=writer,
    window=metrics.window,
    shown=SHOWN,
  )

  def evaluate(step: int) -> None:
    with report.apart('eval'):
      evals = evaluation.evaluate_all(run.infer, state, config, mesh)
    results.update(step=step, eval=evals)
    results['train_images_per_sec'] = report.images_per_sec or results['train_images_per_sec']
    writer.write_scalars(step, evaluation.scalars(evals))
    workdir_lib.append_eval_records(workdir, evaluation.records(evals, config, step))
    workdir_lib.write_results(workdir, results)
    console.say(f'eval step {step}:\n{evaluation.table(evals)}')
    if paths.is_url(workdir):
      writer.flush()

  step = run.start_step
  report(step)
  try:
    with jax.set_mesh(mesh), checkpointing.naming_last_commit(manager):
      while step < num_steps:
        state, step_metrics = run.step_fn(state, next(run.batches))
        step += 1
        metrics.add(step, step_metrics)
        report(step)
        now = loop_lib.due(
          step,
          num_steps,
          checkpoint_every=config.checkpoint_every_steps,
          eval_every=config.eval_every_steps,
          preempted=preemption.reached(manager, step),
        )
        if now.check:
          metrics.check()
        if now.save:
          with report.apart('checkpoint'):
            checkpointing.save(manager, step, state)
            if paths.is_url(workdir):
              writer.flush()
        if now.stop:
          logging.warning('preempted at step %d: checkpoint saved, stopping', step)
          return {**results, 'step': step, 'preempted': True}
        if now.evaluate:
          evaluate(step)
      evaluate(step)
      checkpointing.wait_saved(manager, step, state)
    return results
  finally:
    preemption.close()
    if not storage.outage_declared():
      writer.close()
      checkpointing.finish(manager)
