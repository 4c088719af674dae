"""Optimizers from config.optimizer: SGD (Nesterov) or AdamW, warmup + cosine, decoupled decay."""

import jax
import ml_collections
import optax

from halonet import errors
from halonet.models.keys import CLASSIFIER

OPTIMIZERS = ('sgd', 'adamw')
TRAINABLE = ('all', 'head')  # config.trainable: every parameter, or the classifier alone.


def learning_rate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """Linear warmup to lr * batch/256 (the linear scaling rule), then cosine to zero."""
  peak = config.optimizer.learning_rate * config.batch_size / 256
  warmup = min(int(round(config.optimizer.warmup_epochs * steps_per_epoch)), total_steps)
  cosine = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup, 1))
  if warmup == 0:
    return cosine
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), cosine], [warmup])


def decay_mask(params: optax.Params) -> optax.Params:
  """Decays only matrices and conv kernels: BN scales/offsets and biases are the 1-D leaves."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """The update rule for config.optimizer.name, with optional global-norm clipping first; with
  config.trainable='head' it updates the classifier only (optax.multi_transform)."""
  opt = config.optimizer
  if opt.name == 'sgd':
    # Decay added after momentum so it is decoupled from the gradient history (SGDW).
    update = optax.chain(
      optax.trace(decay=opt.momentum, nesterov=True),
      optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(schedule),
    )
  elif opt.name == 'adamw':
    update = optax.adamw(
      schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask
    )
  else:
    raise errors.ConfigError(f'config.optimizer.name={opt.name!r} is not one of {OPTIMIZERS}')
  if opt.grad_clip_norm > 0:
    update = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), update)
  if config.trainable == 'head':  # Linear probe / head-only fine-tuning: the rest never moves.
    return optax.multi_transform({'train': update, 'frozen': optax.set_to_zero()}, trainable_labels)
  return update


def trainable_labels(params: optax.Params) -> optax.Params:
  """'train' for the classifier's parameters, 'frozen' for every other."""
  return {
    name: jax.tree.map(lambda _, n=name: 'train' if n == CLASSIFIER else 'frozen', subtree)
    for name, subtree in params.items()
  }
