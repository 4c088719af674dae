"""A training run, set up before its first step: its config checked once, its network built once
(with the attention forms decided before any step compiles), its state restored or initialised,
its batches opened and its steps compiled. The loop (loop.py) then only runs it."""

from collections.abc import Callable, Iterator
import dataclasses
import itertools
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import Mesh
import ml_collections
import orbax.checkpoint as ocp

from halonet import console
from halonet import paths
from halonet import sharding
from halonet import storage
from halonet.attention import measure
from halonet.data import pipeline as input_pipeline
from halonet.evaluators import run as evaluators_lib
from halonet.evaluators import specs as evaluator_specs
from halonet.models import networks
from halonet.train import checkpointing
from halonet.train import config_checks
from halonet.train import evaluation as eval_lib
from halonet.train import finetune
from halonet.train import lease as lease_lib
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib


@dataclasses.dataclass
class Run:
  """What the loop needs, made once: the step and eval functions are compiled, the state is on
  the mesh, and the batches start at `start_step`."""

  config: ml_collections.ConfigDict
  workdir: str
  manager: ocp.CheckpointManager
  mesh: Mesh
  sizes: dict[str, int]  # Examples per split.
  model: nn.Module
  state: train_step_lib.TrainState
  batches: Iterator[dict[str, jax.Array]]
  step_fn: Callable[..., Any]
  eval_fn: Callable[..., Any]
  evaluators: list[evaluator_specs.Evaluator]  # config.evals.
  infer_of: Callable[[Any], evaluators_lib.Infer]  # Their model outputs, compiled when first due.
  start_step: int
  num_steps: int
  num_params: int
  compile_seconds: dict[str, float]
  previous: dict[str, Any]  # The workdir's results.json before this start ({} if none).
  lease: lease_lib.Lease | None  # Held by process 0 until the run ends.


def _spec(x: jax.Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def is_finished(
  config: ml_collections.ConfigDict, stored: dict | None, step: int, num_steps: int, results: dict
) -> bool:
  """Whether the workdir (its `stored` config.json) holds this very config's run, trained to its
  end and evaluated there."""
  same = stored is not None and not workdir_lib.changed_fields(stored, workdir_lib.as_json(config))
  return same and step == num_steps == results.get('step')


def set_up(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> Run | None:
  """The run of `config` in `workdir`, resumed from its latest checkpoint if it has one; None if
  workdir already holds this very run, finished (then nothing is touched). Every check that can
  refuse the run comes before anything compiles or is written."""
  config_checks.validate_config(config)
  storage.set_budget(60 * config.storage_outage_minutes)
  sizes = train_step_lib.split_sizes(config)
  evaluators = evaluator_specs.parse_all(config.evals)
  evaluators_lib.check_available(config, evaluators)
  paths.check_writable(workdir, 'workdir')
  stored = workdir_lib.stored_config(workdir)  # A garbled one is named before anything is made.
  lease = lease_lib.acquire(workdir, say=console.say)  # One run per workdir, before any write.
  try:
    return _set_up(config, workdir, allow_config_change, sizes, stored, lease, evaluators)
  except BaseException:
    if lease is not None:
      lease.release()
    raise


def _set_up(
  config: ml_collections.ConfigDict,
  workdir: str,
  allow_config_change: bool,
  sizes: dict[str, int],
  stored: dict | None,
  lease: lease_lib.Lease | None,
  evaluators: list[evaluator_specs.Evaluator],
) -> Run | None:
  """set_up's work once the workdir's lease is held."""
  train_examples = sizes[config.input.train_split]
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  # None, not 0, means nothing to resume: a workdir whose only checkpoint is step 0 (a converted
  # run) resumes from it.
  latest = manager.latest_step()
  resuming = latest is not None
  start_step = latest if resuming else 0
  previous = workdir_lib.read_results(workdir)
  tx, schedule, num_steps = train_step_lib.optimization(config, train_examples)
  if is_finished(config, stored, start_step, num_steps, previous):
    manager.close()
    if lease is not None:
      lease.release()
    console.say(f'{workdir} already finished at step {start_step}; its results.json is unchanged')
    return None
  mesh = sharding.create_mesh(config.mesh_shape)
  model = networks.build_model(config)
  init, abstract = train_step_lib.abstract_train_state(config, model, tx, mesh)
  # A fine-tune's source is checked (path, checkpoint, parameter shapes) before anything compiles.
  source = None
  if config.init_from and not resuming:
    source_dir, source_step, source_config = finetune.source_run(config, workdir)
    changed = finetune.reinitialised(
      abstract.params, networks.abstract_variables(source_config)['params']
    )
    source = (source_dir, source_step, source_config, changed)
  start_step, state = checkpointing.resume(
    manager,
    abstract,
    workdir,
    advice='train it in a new workdir (config.init_from fine-tunes from this run)',
    say=console.say,
  )
  resuming = state is not None
  workdir_lib.check_and_store_config(config, workdir, allow_config_change, start_step)
  logging.info('config:\n%s', config)
  console.say(
    f'{jax.device_count()} {jax.default_backend()} devices in {jax.process_count()} '
    f'process(es), mesh {dict(mesh.shape)}; compute dtype {model.dtype}'
  )
  # 'auto' on an accelerator: each attention layer's form timed here (or as recorded before).
  measured = measure.for_run(
    model,
    config.model.attention_impl,
    config.image_size,
    config.batch_size // mesh.shape['data'],
    workdir,
    say=console.say,
    mesh_shape=dict(mesh.shape),
  )
  if measured:
    model = model.clone(attention=model.attention.with_measured(measured))
  forms = sorted({form for _, form in measured}) or [model.attention.default]
  how = f' (measured per layer, {measure.CHOICE_FILE})' if measured else ''
  console.say(f'attention: {", ".join(forms)}{how}')
  # The iterator is a pure function of (seed, process, step): resuming replays the same batches.
  batches = sharding.prefetch_to_device(
    input_pipeline.create_split(
      config.input,
      config.input.train_split,
      image_size=config.image_size,
      num_classes=config.num_classes,
      seed=config.seed,
      train=True,
      batch_size=config.batch_size // jax.process_count(),
      split_size=train_examples,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_step=start_step,
    ),
    mesh,
  )
  state_shardings = train_step_lib.shardings_of(abstract)
  if resuming:
    console.say(f'resumed from checkpoint at step {start_step}')
  else:
    state = jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.seed))
  if source:
    state = finetune.start_state(state, mesh, *source)
  num_params = networks.param_count(abstract.params)
  console.say(f'{num_params:,} parameters, {num_steps} train steps')
  # Both steps are compiled here, timed apart, so images/s and the ETA measure training only.
  first_batch = next(batches)
  batches = itertools.chain([first_batch], batches)
  compile_start = time.perf_counter()
  step_fn = (
    train_step_lib.make_train_step(config, model, tx, schedule, mesh, state_shardings)
    .lower(abstract, jax.tree.map(_spec, first_batch))
    .compile()
  )
  compile_seconds = {'train_step': time.perf_counter() - compile_start}
  eval_fn, compile_seconds['eval_step'] = eval_lib.compile_eval_step(
    model, mesh, {'params': abstract.params, 'batch_stats': abstract.batch_stats}, config
  )
  console.say(
    f'compiled in {compile_seconds["train_step"]:.1f} s (train step) + '
    f'{compile_seconds["eval_step"]:.1f} s (eval step)'
  )
  return Run(
    config=config,
    workdir=workdir,
    manager=manager,
    mesh=mesh,
    sizes=sizes,
    model=model,
    state=state,
    batches=batches,
    step_fn=step_fn,
    eval_fn=eval_fn,
    evaluators=evaluators,
    infer_of=eval_lib.make_infer(model, mesh, config),
    start_step=start_step,
    num_steps=num_steps,
    num_params=num_params,
    compile_seconds=compile_seconds,
    previous=previous,
    lease=lease,
  )
