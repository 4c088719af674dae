"""Training loop: one jitted step over a ('data', 'spatial') mesh, periodic exact evaluation,
async Orbax checkpoints, and a clean stop on preemption or a non-finite loss."""

from collections.abc import Callable
import itertools
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from halonet import console
from halonet import errors
from halonet import paths
from halonet import sharding
from halonet.attention import measure
from halonet.data import pipeline as input_pipeline
from halonet.models import networks
from halonet.train import checkpointing
from halonet.train import config_checks
from halonet.train import evaluation as eval_lib
from halonet.train import event_writer
from halonet.train import finetune
from halonet.train import progress
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib


def _spec(x: jax.Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


class _TrainMetrics:
  """The steps' device metrics, fetched only when needed (every step would stall dispatch). Each
  fetch checks that the loss and the updated state are finite, and every save waits for it, so
  every saved step is known finite."""

  def __init__(self, last_good: Callable[[], str]):
    self._last_good = last_good
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._fetched: list[dict[str, np.ndarray]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def check(self) -> None:
    """Fetches the pending steps' metrics; raises at the first non-finite one."""
    fetched = jax.device_get([m for _, m in self._pending])
    for (step, _), m in zip(self._pending, fetched):
      if not (np.isfinite(m['loss']) and m['state_finite']):
        what = (
          f'loss is {m["loss"]}'
          if not np.isfinite(m['loss'])
          else 'the updated parameters or optimizer state are not finite'
        )
        raise FloatingPointError(
          f'{what} at step {step}; stopped without saving it, {self._last_good()}'
        )
    self._fetched += fetched
    self._pending.clear()

  def window(self) -> dict[str, float]:
    """Means over the steps since the previous window (the last step's learning rate)."""
    self.check()
    fetched, self._fetched = self._fetched, []
    means = {k: float(np.mean([m[k] for m in fetched])) for k in ('loss', 'top1', 'grad_norm')}
    return {**means, 'lr': float(fetched[-1]['lr'])}


class _Preemption:
  """SIGTERM sets a flag the loop checks each step; multi-host runs use Orbax's sync point."""

  def __init__(self):
    self.event = threading.Event()
    self.previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())

  def reached(self, manager, step: int) -> bool:
    return self.event.is_set() or manager.reached_preemption(step)

  def close(self):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def _is_finished(
  config: ml_collections.ConfigDict,
  workdir: str,
  step: int,
  train_examples: int,
  results: dict[str, Any],
) -> bool:
  """Whether workdir holds this very config's run, trained to its end and evaluated there."""
  stored = workdir_lib.stored_config(workdir)
  same = stored is not None and not workdir_lib.changed_fields(stored, workdir_lib.as_json(config))
  return same and step == train_step_lib.total_train_steps(config, train_examples) == results.get(
    'step'
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains (resuming from workdir/checkpoints if present) and returns the last results."""
  config_checks.validate_config(config)
  sizes = train_step_lib.split_sizes(config)
  paths.check_writable(workdir, 'workdir')
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  # None, not 0, means nothing to resume: a workdir whose only checkpoint is step 0 (a converted
  # run) resumes from it.
  latest = manager.latest_step()
  resuming = latest is not None
  start_step = latest if resuming else 0
  previous = workdir_lib.read_results(workdir)
  if _is_finished(config, workdir, start_step, sizes[config.input.train_split], previous):
    manager.close()  # The same command on a finished run: nothing to do, nothing rewritten.
    console.say(f'{workdir} already finished at step {start_step}; its results.json is unchanged')
    return previous
  # A fine-tune's source is checked (path, checkpoint, parameter shapes) before anything compiles.
  source = None
  if config.init_from and not resuming:
    source_dir, source_step, source_config = finetune.source_run(config, workdir)
    changed = finetune.reinitialised(
      networks.abstract_variables(config)['params'],
      networks.abstract_variables(source_config)['params'],
    )
    source = (source_dir, source_step, source_config, changed)
  mesh = sharding.create_mesh(config.mesh_shape)
  model, tx, schedule, num_steps = train_step_lib.build(config, sizes[config.input.train_split])
  init, abstract = train_step_lib.abstract_train_state(config, model, tx, mesh)
  if resuming:  # From shapes alone: no flag can resume a checkpoint into another state.
    mismatch = checkpointing.shape_mismatch(manager, start_step, abstract)
    if mismatch:
      manager.close()
      raise errors.ConfigError(
        f'cannot resume {paths.as_string(workdir)} from step {start_step} with this config: '
        f'{mismatch}; train it in a new workdir (config.init_from fine-tunes from this run)'
      )
  workdir_lib.check_and_store_config(config, workdir, allow_config_change, start_step)
  logging.info('config:\n%s', config)
  console.say(
    f'{jax.device_count()} {jax.default_backend()} devices in {jax.process_count()} '
    f'process(es), mesh {dict(mesh.shape)}; compute dtype {model.dtype}'
  )
  # 'auto' on an accelerator: each attention layer's form timed here (or as recorded before).
  choice = measure.for_run(
    model,
    config.model.attention_impl,
    config.image_size,
    config.batch_size // mesh.shape['data'],
    workdir,
    say=console.say,
  )
  if choice:
    model = networks.create_model(config, attention_choice=choice)
  forms = sorted({impl for _, impl in choice}) or [model.attention_impl]
  measured = f' (measured per layer, {measure.CHOICE_FILE})' if choice else ''
  console.say(f'attention: {", ".join(forms)}{measured}')
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
      split_size=sizes[config.input.train_split],
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_step=start_step,
    ),
    mesh,
  )

  state_shardings = train_step_lib.shardings_of(abstract)
  if resuming:
    state = checkpointing.restore(manager, abstract, start_step)
    console.say(f'resumed from checkpoint at step {start_step}')
  else:
    state = jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.seed))
  if source:
    state = finetune.start_state(state, mesh, *source)
  num_params = networks.count_params(config)
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
  writer = event_writer.create(workdir, just_logging=jax.process_index() > 0)
  preemption = _Preemption()

  def last_good() -> str:
    latest = manager.latest_step()
    return (
      'no checkpoint was saved'
      if latest is None
      else f'last good checkpoint is step {latest} (all parameters finite)'
    )

  metrics_of_steps = _TrainMetrics(last_good)
  report = progress.ProgressReport(
    num_steps=num_steps,
    batch_size=config.batch_size,
    every_steps=config.log_every_steps,
    writer=writer,
    window=metrics_of_steps.window,
  )
  profile = progress.StepProfile(config.profile_steps, workdir) if config.profile_steps else None
  results = {
    'step': start_step,
    'num_params': num_params,
    'compile_seconds': compile_seconds,
    'train_images_per_sec': previous.get('train_images_per_sec'),
  }

  def run_eval(step: int) -> None:
    with report.apart('eval'):
      evals = eval_lib.evaluate_all(eval_fn, state, config, sizes, mesh)
    results.update(step=step, **{f'{name}_eval': v for name, v in evals.items()})
    for name, splits in evals.items():
      writer.write_scalars(
        step, {f'eval/{name}/{split}/{k}': v for split, r in splits.items() for k, v in r.items()}
      )
      if step < num_steps:  # The final results get their own lines below.
        console.say(
          f'eval step {step} ({name} params): '
          + ', '.join(
            f'{split} top-1 {r["top1"]:.2f}% top-5 {r["top5"]:.2f}%' for split, r in splits.items()
          )
        )
    results['train_images_per_sec'] = report.images_per_sec or results['train_images_per_sec']
    workdir_lib.write_results(workdir, results)
    if paths.is_url(workdir):
      writer.flush()

  step = start_step
  hooks = [report, profile] if profile else [report]
  for hook in hooks:
    hook(step)
  try:
    with jax.set_mesh(mesh):
      while step < num_steps:
        state, metrics = step_fn(state, next(batches))
        step += 1
        metrics_of_steps.add(step, metrics)
        report(step)
        if profile:
          profile(step, metrics)
        preempted = preemption.reached(manager, step)
        save = step % config.checkpoint_every_steps == 0 or step == num_steps or preempted
        eval_now = step % config.eval_every_steps == 0 and step < num_steps
        if save or eval_now:
          metrics_of_steps.check()  # Never saves or evaluates a step not known finite.
        if save:
          with report.apart('checkpoint'):
            checkpointing.save(manager, step, state)
            if paths.is_url(workdir):  # A bucket gets whole events files: the metrics up to a
              writer.flush()  # checkpoint then outlive a kill, as the state does.
        if preempted:
          logging.warning('preempted at step %d: checkpoint saved, stopping', step)
          return {**results, 'step': step, 'preempted': True}
        if eval_now:
          run_eval(step)
      run_eval(step)
    for name in ('raw', 'ema'):
      for split, r in results.get(f'{name}_eval', {}).items():
        console.say(
          f'final {split} accuracy ({name} params, step {step}): '
          f'top-1 {r["top1"]:.2f}% top-5 {r["top5"]:.2f}%'
        )
    return results
  finally:
    if profile:
      profile.close()
    preemption.close()
    writer.close()
    checkpointing.finish(manager)
