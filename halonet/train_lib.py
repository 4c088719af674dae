"""Training loop: one jitted step over a ('data', 'spatial') mesh, periodic exact evaluation,
async Orbax checkpoints, and a clean stop on preemption or a non-finite loss."""

from collections.abc import Callable
import datetime
import functools
import itertools
import math
import signal
import threading
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from halonet import checkpointing
from halonet import config_checks
from halonet import console
from halonet import errors
from halonet import eval_lib
from halonet import event_writer
from halonet import finetune
from halonet import input_pipeline
from halonet import model as model_lib
from halonet import optim
from halonet import paths
from halonet import profiling
from halonet import sharding
from halonet import workdir as workdir_lib
from halonet.attention import measure

TRAIN_BATCH_KEYS = ('image', 'label')


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; the input position is `step` itself."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # None unless config.ema_decay > 0.


def split_sizes(config: ml_collections.ConfigDict, train: bool = True) -> dict[str, int]:
  """Examples in every split the run reads (the train split only if `train`), read once here.

  The one place a run touches its data before compiling, so a missing dataset fails first.
  """
  splits = (config.train_split, *config.eval_splits) if train else tuple(config.eval_splits)
  splits = tuple(dict.fromkeys(splits))
  input_pipeline.check_num_classes(config, splits[0])
  return {split: input_pipeline.num_examples(config, split) for split in splits}


def steps_per_epoch(config: ml_collections.ConfigDict, train_examples: int) -> int:
  """Full global batches per epoch; the remainder of each shuffled epoch is dropped."""
  return train_examples // config.batch_size


def total_train_steps(config: ml_collections.ConfigDict, train_examples: int) -> int:
  """config.num_train_steps if set, else num_epochs of full global batches."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(math.ceil(config.num_epochs * steps_per_epoch(config, train_examples)))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-example loss; `labels` are class ids [B] or (mixup/cutmix) soft targets [B, C]."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes) if labels.ndim == 1 else labels
  targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def abstract_train_state(
  config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[Callable[[jax.Array], TrainState], TrainState]:
  """The init function and its output's shapes, each leaf carrying its (replicated) sharding.

  Shapes come from `jax.eval_shape`, so restoring a checkpoint never builds the state twice.
  """

  def init(rng: jax.Array) -> TrainState:
    params_rng, dropout_rng = jax.random.split(rng)
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = model.init({'params': params_rng, 'dropout': dropout_rng}, images, train=False)
    params = variables['params']
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      ema_params=params if config.ema_decay > 0 else None,
    )

  replicated = sharding.replicated(mesh)
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
    jax.eval_shape(init, jax.random.key(0)),
  )
  return init, abstract


def shardings_of(abstract: Any) -> Any:
  return jax.tree.map(lambda a: a.sharding, abstract)


def all_finite(tree: Any) -> jax.Array:
  """True iff every float leaf of `tree` is finite (one fused pass over the state)."""
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves))


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on the global batch; returns the new state and scalars for logging."""
  # Dropout noise is a function of (seed, step), so a resumed run replays it exactly.
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1), state.step)
  images = input_pipeline.normalize_images(batch['image'], jnp.dtype(model.dtype))
  labels = batch['label']

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': rng},
    )
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(cross_entropy(logits, labels, config.label_smoothing))
    return loss, (logits, updates.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = optax.incremental_update(params, ema, step_size=1.0 - config.ema_decay)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema_params=ema
  )
  hard_labels = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
  metrics = {
    'loss': loss,
    'top1': 100.0 * jnp.mean(jnp.argmax(logits, axis=-1) == hard_labels),
    'grad_norm': optax.tree.norm(grads),
    'lr': schedule(state.step),
    # The loss is computed before the update: only this says the state to be saved is finite.
    'state_finite': all_finite(new_state),
  }
  return new_state, metrics


def make_train_step(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  mesh: Mesh,
  state_shardings: Any,
):
  """Jitted step: state replicated and donated (updated in place), batch as `batch_shardings`."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config)
  return jax.jit(
    sharding.traced_within(mesh, step),
    in_shardings=(state_shardings, sharding.batch_shardings(mesh, TRAIN_BATCH_KEYS)),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def lower_train_step(
  config: ml_collections.ConfigDict, mesh: Mesh, backend: str | None = None
) -> tuple[jax.stages.Lowered, nn.Module]:
  """The train step for a global batch of config.batch_size, lowered from shapes alone.

  Nothing is initialised and no data is read (a fixed 10-step schedule stands in for the
  dataset's), so `.compile()` gives XLA's per-device cost and buffer plan of H7 at 600 px on any
  machine. `backend` builds the model as that backend would ('auto' fields), e.g. 'tpu'.
  """
  model = model_lib.create_model(config, backend=backend)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=10)
  tx = optim.create_optimizer(config, schedule)
  _, abstract = abstract_train_state(config, model, tx, mesh)
  step = make_train_step(config, model, tx, schedule, mesh, shardings_of(abstract))
  size, on = config.image_size, sharding.batch_shardings(mesh, TRAIN_BATCH_KEYS)
  batch = {
    'image': jax.ShapeDtypeStruct(
      (config.batch_size, size, size, 3), jnp.uint8, sharding=on['image']
    ),
    'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=on['label']),
  }
  return step.lower(abstract, batch), model


def build(
  config: ml_collections.ConfigDict, train_examples: int
) -> tuple[nn.Module, optax.GradientTransformation, optax.Schedule, int]:
  """Model, optimizer, lr schedule and step count for a train split of `train_examples`."""
  num_steps = total_train_steps(config, train_examples)
  schedule = optim.learning_rate_schedule(
    config, steps_per_epoch(config, train_examples), num_steps
  )
  return (
    model_lib.create_model(config),
    optim.create_optimizer(config, schedule),
    schedule,
    num_steps,
  )


def evaluate_all(
  eval_fn, state: TrainState, config: ml_collections.ConfigDict, sizes: dict[str, int], mesh: Mesh
) -> dict[str, dict[str, dict[str, float]]]:
  """Every eval split with the raw params, and again with the EMA params when kept."""
  weights = {'raw': state.params}
  if state.ema_params is not None:
    weights['ema'] = state.ema_params
  return {
    name: {
      split: eval_lib.evaluate(
        eval_fn,
        {'params': params, 'batch_stats': state.batch_stats},
        config,
        split,
        sizes[split],
        mesh,
      )
      for split in config.eval_splits
    }
    for name, params in weights.items()
  }


def _spec(x: jax.Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes // 60}:{minutes % 60:02d}:{seconds:02d}'


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


def _fine_tune_start(
  state: TrainState,
  mesh: Mesh,
  source_dir: str,
  source_step: int | None,
  source_config: ml_collections.ConfigDict,
  changed: dict[str, tuple[tuple, tuple]],
) -> TrainState:
  """The fresh state with the source run's parameters and BN statistics (halonet/finetune.py);
  the optimizer state (zeros and a zero count for SGD and AdamW) stays as initialised."""
  source, _, _ = restore_run(source_config, source_dir, mesh, source_step)
  params = finetune.start_from(state.params, source.params, changed)
  fresh = ', '.join(f'{name} {was}->{now}' for name, (was, now) in changed.items())
  console.say(
    f'initialised from {source_dir} step {int(source.step)}'
    + (f'; re-initialised {fresh}' if fresh else '')
  )
  # The classifier has no BatchNorm statistics: all of the source's carry over.
  return state.replace(
    params=params,
    batch_stats=source.batch_stats,
    ema_params=params if state.ema_params is not None else None,
  )


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
  return same and step == total_train_steps(config, train_examples) == results.get('step')


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains (resuming from workdir/checkpoints if present) and returns the last results."""
  config_checks.validate_config(config)
  sizes = split_sizes(config)
  paths.check_writable(workdir, 'workdir')
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  start_step = manager.latest_step() or 0
  previous = workdir_lib.read_results(workdir)
  if _is_finished(config, workdir, start_step, sizes[config.train_split], previous):
    manager.close()  # The same command on a finished run: nothing to do, nothing rewritten.
    console.say(f'{workdir} already finished at step {start_step}; its results.json is unchanged')
    return previous
  # A fine-tune's source is checked (path, checkpoint, parameter shapes) before anything compiles.
  source = None
  if config.init_from and not start_step:
    source_dir, source_step, source_config = finetune.source_run(config, workdir)
    changed = finetune.reinitialised(
      model_lib.abstract_variables(config)['params'],
      model_lib.abstract_variables(source_config)['params'],
    )
    source = (source_dir, source_step, source_config, changed)
  mesh = sharding.create_mesh(config.mesh_shape)
  model, tx, schedule, num_steps = build(config, sizes[config.train_split])
  init, abstract = abstract_train_state(config, model, tx, mesh)
  if start_step:  # From shapes alone: no flag can resume a checkpoint into another state.
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
    model = model_lib.create_model(config, attention_choice=choice)
  forms = sorted({impl for _, impl in choice}) or [model.attention_impl]
  measured = f' (measured per layer, {measure.CHOICE_FILE})' if choice else ''
  console.say(f'attention: {", ".join(forms)}{measured}')
  # The iterator is a pure function of (seed, process, step): resuming replays the same batches.
  batches = sharding.prefetch_to_device(
    input_pipeline.create_split(
      config,
      config.train_split,
      train=True,
      batch_size=config.batch_size // jax.process_count(),
      split_size=sizes[config.train_split],
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_step=start_step,
    ),
    mesh,
  )

  state_shardings = shardings_of(abstract)
  if start_step:
    state = checkpointing.restore(manager, abstract, start_step)
    console.say(f'resumed from checkpoint at step {start_step}')
  else:
    state = jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.seed))
  if source:
    state = _fine_tune_start(state, mesh, *source)
  num_params = model_lib.count_params(config)
  console.say(f'{num_params:,} parameters, {num_steps} train steps')
  # Both steps are compiled here, timed apart, so images/s and the ETA measure training only.
  first_batch = next(batches)
  batches = itertools.chain([first_batch], batches)
  compile_start = time.perf_counter()
  step_fn = (
    make_train_step(config, model, tx, schedule, mesh, state_shardings)
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
  trace = profiling.StepTrace(config.profile_steps, workdir)
  pending = []  # (step, device metrics) not yet fetched: fetching every step would stall dispatch.
  results = {
    'step': start_step,
    'num_params': num_params,
    'compile_seconds': compile_seconds,
    'train_images_per_sec': previous.get('train_images_per_sec'),
  }
  window_start = time.perf_counter()

  def last_good() -> str:
    # Every save waits for this check of its step, so every saved step is known finite.
    latest = manager.latest_step()
    return (
      'no checkpoint was saved'
      if latest is None
      else f'last good checkpoint is step {latest} (all parameters finite)'
    )

  def flush_metrics(step: int) -> None:
    nonlocal window_start
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not (np.isfinite(m['loss']) and m['state_finite']):
        what = (
          f'loss is {m["loss"]}'
          if not np.isfinite(m['loss'])
          else 'the updated parameters or optimizer state are not finite'
        )
        raise FloatingPointError(f'{what} at step {s}; stopped without saving it, {last_good()}')
    elapsed = time.perf_counter() - window_start
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in ('loss', 'top1', 'grad_norm')}
    scalars['lr'] = float(fetched[-1]['lr'])
    scalars['images_per_sec'] = len(fetched) * config.batch_size / elapsed
    results['train_images_per_sec'] = scalars['images_per_sec']
    writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()})
    eta = (num_steps - step) * elapsed / len(fetched)
    console.say(
      f'step {step}/{num_steps} loss {scalars["loss"]:.4f} top1 {scalars["top1"]:.2f} '
      f'lr {scalars["lr"]:.3g} img/s {scalars["images_per_sec"]:.1f} '
      f'ETA {_format_seconds(eta)}'
    )
    pending.clear()
    window_start = time.perf_counter()

  def run_eval(step: int) -> None:
    nonlocal window_start
    evals = evaluate_all(eval_fn, state, config, sizes, mesh)
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
    workdir_lib.write_results(workdir, results)
    if paths.is_url(workdir):
      writer.flush()
    window_start = time.perf_counter()

  step = start_step
  try:
    with jax.set_mesh(mesh):
      while step < num_steps:
        trace.before(step + 1)
        state, metrics = step_fn(state, next(batches))
        step += 1
        trace.after(step, metrics)
        pending.append((step, metrics))
        preempted = preemption.reached(manager, step)
        save = step % config.checkpoint_every_steps == 0 or step == num_steps or preempted
        eval_now = step % config.eval_every_steps == 0 and step < num_steps
        if step % config.log_every_steps == 0 or save or eval_now:
          flush_metrics(step)  # Also the finite-state check that guards every save.
        if save:
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
    trace.stop()
    preemption.close()
    writer.close()
    checkpointing.finish(manager)


def restore_run(
  config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, step: int | None = None
) -> tuple[TrainState, TrainState, nn.Module]:
  """A run's saved state at `step` (default: latest), replicated on `mesh`, read-only; with its
  abstract state and the model `config` builds (config must be the run's as to the model)."""
  model = model_lib.create_model(config, attention_choice=measure.recorded_choice(workdir) or ())
  # Only the optimizer state's structure matters for restoring, not the schedule's values.
  tx = optim.create_optimizer(config, optax.constant_schedule(0.0))
  _, abstract = abstract_train_state(config, model, tx, mesh)
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints, read_only=True)
  try:
    return checkpointing.restore(manager, abstract, step), abstract, model
  finally:
    manager.close()


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, Any]:
  """Evaluates a saved step (default: latest) and appends its records to
  workdir/eval_records.jsonl: one per (step, dataset, split, weights), never replacing any."""
  config_checks.validate_config(config)
  stored = workdir_lib.stored_config(workdir)
  if stored is not None:
    diff = workdir_lib.refused_for_eval(
      workdir_lib.changed_fields(stored, workdir_lib.as_json(config))
    )
    if diff:
      raise errors.ConfigError(
        f'the checkpoints in {workdir} were trained with a different '
        f'model (fields: {", ".join(diff)})'
      )
  sizes = split_sizes(config, train=False)
  mesh = sharding.create_mesh(config.mesh_shape)
  state, abstract, model = restore_run(config, workdir, mesh, step)
  paths.check_writable(workdir, 'workdir')  # Its records are written there after evaluating.
  step = int(state.step)
  eval_fn, seconds = eval_lib.compile_eval_step(
    model, mesh, {'params': abstract.params, 'batch_stats': abstract.batch_stats}, config
  )
  logging.info('compiled the eval step in %.1f s', seconds)
  with jax.set_mesh(mesh):
    evals = evaluate_all(eval_fn, state, config, sizes, mesh)
  when = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
  records = [
    {
      'step': step,
      'dataset': config.dataset,
      'split': split,
      'weights': name,
      'image_size': config.image_size,
      'crop_fraction': config.crop_fraction,
      'evaluated_at': when,
      **r,
    }
    for name, splits in evals.items()
    for split, r in splits.items()
  ]
  for r in records:
    console.say(
      f'step {step} {r["dataset"]} {r["split"]} ({r["weights"]} params): top-1 '
      f'{r["top1"]:.2f}% top-5 {r["top5"]:.2f}% loss {r["loss"]:.4f} '
      f'{r["images_per_sec"]:.1f} img/s ({r["count"]} images)'
    )
  workdir_lib.append_eval_records(workdir, records)
  return {
    'step': step,
    'num_params': model_lib.count_params(config),
    **{f'{name}_eval': v for name, v in evals.items()},
  }
