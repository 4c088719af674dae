"""The state a run trains and saves, and one train step: loss, gradients, optimizer update and
EMA as one `jax.jit` over a ('data', 'spatial') mesh; how many steps a run takes; restoring a
run's saved state. The loop that drives it is loop.py's."""

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from halonet import console
from halonet import sharding
from halonet.attention import measure
from halonet.data import pipeline as input_pipeline
from halonet.data import preprocessing
from halonet.data import sources as data_sources
from halonet.models import networks
from halonet.train import checkpointing
from halonet.train import optim

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
  splits = (
    (config.input.train_split, *config.input.eval_splits)
    if train
    else tuple(config.input.eval_splits)
  )
  splits = tuple(dict.fromkeys(splits))
  if splits:  # eval.py may evaluate config.evals alone.
    data_sources.check_num_classes(config.input, splits[0], config.num_classes)
  return {
    split: data_sources.num_examples(config.input, split, config.num_classes) for split in splits
  }


def total_train_steps(config: ml_collections.ConfigDict, train_examples: int) -> int:
  """config.num_train_steps if set, else num_epochs of full global batches."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(
    math.ceil(config.num_epochs * input_pipeline.steps_per_epoch(train_examples, config.batch_size))
  )


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
  images = preprocessing.normalize_images(batch['image'], config.input, jnp.dtype(model.dtype))
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
  return jit_step(step, mesh, state_shardings, TRAIN_BATCH_KEYS)


def jit_step(
  step: Callable[..., Any], mesh: Mesh, state_shardings: Any, batch_keys: Sequence[str]
) -> Any:
  """`step(state, batch) -> (state, metrics)` jitted: the state keeps its shardings and is donated
  (updated in place), the batch's `batch_keys` are split over the data axis, metrics replicated."""
  return jax.jit(
    sharding.traced_within(mesh, step),
    in_shardings=(state_shardings, sharding.batch_shardings(mesh, batch_keys)),
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
  model = networks.create_model(config, backend=backend)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=10)
  tx = optim.create_optimizer(config, schedule)
  _, abstract = abstract_train_state(config, model, tx, mesh)
  step = make_train_step(config, model, tx, schedule, mesh, shardings_of(abstract))
  size = config.image_size
  batch = {  # Placed by make_train_step's in_shardings.
    'image': jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8),
    'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
  }
  return step.lower(abstract, batch), model


def optimization(
  config: ml_collections.ConfigDict, train_examples: int
) -> tuple[optax.GradientTransformation, optax.Schedule, int]:
  """Optimizer, lr schedule and step count for a train split of `train_examples`."""
  num_steps = total_train_steps(config, train_examples)
  schedule = optim.learning_rate_schedule(
    config, input_pipeline.steps_per_epoch(train_examples, config.batch_size), num_steps
  )
  return optim.create_optimizer(config, schedule), schedule, num_steps


def build(
  config: ml_collections.ConfigDict, train_examples: int
) -> tuple[nn.Module, optax.GradientTransformation, optax.Schedule, int]:
  """Model (its config checked), optimizer, lr schedule and step count, as `optimization`."""
  return (networks.create_model(config), *optimization(config, train_examples))


def restore_run(
  config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, step: int | None = None
) -> tuple[TrainState, TrainState, nn.Module]:
  """A run's saved state at `step` (default: the newest that reads whole), replicated on `mesh`,
  read-only; with its abstract state and the model `config` builds (config must be the run's as
  to the model)."""
  model = networks.create_model(config, measured=measure.recorded_choice(workdir) or ())
  # Only the optimizer state's structure matters for restoring, not the schedule's values.
  tx = optim.create_optimizer(config, optax.constant_schedule(0.0))
  _, abstract = abstract_train_state(config, model, tx, mesh)
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints, read_only=True)
  try:  # A reader steps over a damaged newest step (named) and leaves the run's files alone.
    _, state = checkpointing.restore_readable(manager, abstract, step, say=console.say)
    return state, abstract, model
  finally:
    manager.close()
