"""Training semantics against values computed here by hand, not against the code's own output:
EMA, BatchNorm statistics, the learning rate the optimizer applies, weight decay, batch sharding,
label smoothing, and mixup/cutmix targets."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from configs import tiny
from halonet import sharding
from halonet.models import networks
from halonet.train import optim
from halonet.train import step as train_step_lib
from tests import inputs
from tests import steps


def _step_and_state(config):
  """A fresh state and the jitted train step on one device (a 100-step schedule)."""
  mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
  state, step = steps.fresh_state_and_step(config, mesh, total_steps=100)
  return step, state, mesh


def test_ema_after_one_step_is_decay_times_old_plus_complement_times_new():
  config = tiny.get_config()
  config.ema_decay = 0.9  # 1 - 0.9 != 0.9: swapping the two weights is caught.
  step, state, mesh = _step_and_state(config)
  old = jax.device_get(state.params)
  state, _ = step(state, sharding.shard_batch(steps.random_batch(config), mesh))
  new, ema = jax.device_get((state.params, state.ema_params))
  assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
  jax.tree.map(
    lambda o, n, e: np.testing.assert_allclose(e, 0.9 * o + 0.1 * n, rtol=1e-5, atol=1e-7),
    old,
    new,
    ema,
  )


def test_batchnorm_running_statistics_after_a_step_are_computed_from_the_batch():
  """The stem BatchNorm's running mean and variance after one step: 0.9 x the old + 0.1 x the
  batch's statistics (biased variance, over images and positions) of the stem convolution,
  computed here with NumPy from the images as the step standardises them."""
  config = tiny.get_config()
  step, state, mesh = _step_and_state(config)
  batch = steps.random_batch(config)
  params, old = jax.device_get((state.params, state.batch_stats))
  state, _ = step(state, sharding.shard_batch(batch, mesh))
  new = jax.device_get(state.batch_stats)['stem_bn']
  mean = 255 * np.asarray(config.input.pixel_mean)
  images = (batch['image'].astype(np.float64) - mean) / (255 * np.asarray(config.input.pixel_std))
  kernel = np.asarray(params['stem_conv']['kernel'], np.float64)  # [7, 7, 3, 64]
  padded = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)))
  side = -(-config.image_size // 2)
  patches = np.stack(
    [
      padded[:, dy : dy + 2 * side : 2, dx : dx + 2 * side : 2]
      for dy in range(7)
      for dx in range(7)
    ],
    axis=3,
  )  # [batch, side, side, 49, 3]
  conv = np.einsum('bhwkc,kco->bhwo', patches, kernel.reshape(49, 3, -1))
  batch_mean, batch_var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
  np.testing.assert_allclose(
    new['mean'], 0.9 * old['stem_bn']['mean'] + 0.1 * batch_mean, rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(
    new['var'], 0.9 * old['stem_bn']['var'] + 0.1 * batch_var, rtol=1e-4, atol=1e-5
  )


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_learning_rate_schedule_values(name):
  """Peak lr x batch/256, linear warmup over warmup_epochs, cosine to zero at the end."""
  config = tiny.get_config()
  config.optimizer.name, config.optimizer.learning_rate = name, 0.1
  config.batch_size, config.optimizer.warmup_epochs = 512, 2.0
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  peak = 0.1 * 512 / 256
  cosine = lambda step: peak * 0.5 * (1 + math.cos(math.pi * (step - 20) / 80))
  expected = {
    0: 0.0,
    10: peak / 2,
    19: peak * 19 / 20,
    20: peak,
    21: cosine(21),
    60: peak / 2,
    90: cosine(90),
    100: 0.0,
  }
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, abs=1e-7), step


def _is_decayed(path) -> bool:
  """Written from the rule, not the code: BN scales/offsets and biases are not decayed."""
  return path[-1].key not in ('scale', 'bias')


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_first_update_applies_the_peak_rate_and_decays_only_weights(name):
  """One optimizer update from fresh state, with warmup off (the first rate is the peak), by hand:
  SGD with Nesterov momentum m moves by lr * ((1 + m) g + wd p); AdamW's first bias-corrected step
  is g / (|g| + eps), plus the decoupled lr * wd * p; and, with zero gradients, only the decayed
  leaves change, by the factor 1 - lr * wd."""
  config = tiny.get_config()
  config.optimizer.name, config.optimizer.learning_rate = name, 0.1
  config.optimizer.warmup_epochs, config.optimizer.weight_decay = 0.0, 0.01
  config.batch_size = 512
  lr, wd, m = 0.2, 0.01, config.optimizer.momentum
  params = networks.abstract_variables(config)['params']
  params = jax.tree.map(
    lambda p: np.random.default_rng(p.size).normal(size=p.shape).astype(np.float32), params
  )
  grads = jax.tree.map(
    lambda p: np.random.default_rng(p.size + 1).normal(size=p.shape).astype(np.float32), params
  )
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  tx = optim.create_optimizer(config, schedule)

  def updated(grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)

  def by_hand(path, p, g):
    direction = (1 + m) * g if name == 'sgd' else g / (np.abs(g) + 1e-8)
    return p - lr * (direction + (wd * p if _is_decayed(path) else 0.0))

  jax.tree_util.tree_map_with_path(
    lambda path, got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5),
    updated(grads),
    jax.tree_util.tree_map_with_path(by_hand, params, grads),
  )
  zero = updated(jax.tree.map(np.zeros_like, grads))
  decayed = [
    jax.tree_util.keystr(k)
    for k, _ in jax.tree_util.tree_leaves_with_path(params)
    if _is_decayed(k)
  ]
  assert any('kernel' in k for k in decayed) and any('relative' in k for k in decayed)
  jax.tree_util.tree_map_with_path(
    lambda path, got, p: np.testing.assert_allclose(
      got, p * (1 - lr * wd) if _is_decayed(path) else p, rtol=1e-6
    ),
    zero,
    params,
  )


def test_label_smoothed_loss_of_a_hand_made_batch():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ls = 0.3
  hard = np.array([0, 1])
  want_hard = -((1 - ls) * log_p[[0, 1], hard] + ls / 3 * log_p.sum(-1))
  np.testing.assert_allclose(
    train_step_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(hard), ls), want_hard, rtol=1e-6
  )
  soft = np.array([[0.25, 0.75, 0.0], [0.0, 0.4, 0.6]], np.float32)  # Mixed targets.
  want_soft = -(((1 - ls) * soft + ls / 3) * log_p).sum(-1)
  np.testing.assert_allclose(
    train_step_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(soft), ls), want_soft, rtol=1e-6
  )


@pytest.mark.parametrize('mix', ['mixup', 'cutmix'])
def test_mixed_targets_weigh_the_two_images_as_the_pixels_do(mix, tmp_path):
  """Two one-colour classes: black (class 0) and white (class 1). Whatever pairs the pipeline
  draws, a mixed image's share of white must be its target's weight on class 1: the mean pixel
  / 255 for mixup, the fraction of white pixels for cutmix."""
  for split in ('train', 'test'):
    for label, value in (('black', 0), ('white', 255)):
      os.makedirs(tmp_path / split / label)
      for i in range(4):
        Image.new('RGB', (32, 32), (value,) * 3).save(tmp_path / split / label / f'{i}.png')
  config = tiny.get_config()
  config.input.dataset, config.input.data_dir, config.num_classes = 'image_folder', str(tmp_path), 2
  config.input.mixup_alpha, config.input.cutmix_alpha = (1.0, 0.0) if mix == 'mixup' else (0.0, 1.0)
  batches = inputs.create_split(config, 'train', train=True, batch_size=8)
  checked = 0
  for _, batch in zip(range(4), batches):
    images = batch['image'].astype(np.float64)
    np.testing.assert_allclose(batch['label'].sum(-1), 1.0, rtol=1e-6)
    white = (
      images.mean(axis=(1, 2, 3)) / 255
      if mix == 'mixup'
      else (images == 255).all(-1).mean(axis=(1, 2))
    )
    atol = 0.5 / 255 + 1e-6 if mix == 'mixup' else 1e-6  # Mixup rounds to whole grey levels.
    np.testing.assert_allclose(batch['label'][:, 1], white, atol=atol)
    checked += int(((white > 0.05) & (white < 0.95)).sum())
  assert checked > 0  # Some images really were mixed.


@pytest.mark.parametrize(
  ('num_train_steps', 'num_epochs', 'expected'),
  [
    (7, 90.0, 7),  # Set steps win over epochs.
    (1, 90.0, 1),
    (0, 2.5, 55),  # 1437 // 64 = 22 full batches an epoch; 2.5 epochs are 55 steps.
    (0, 0.1, 3),  # 2.2 steps: a started step is run.
  ],
)
def test_total_train_steps_are_the_set_count_or_epochs_of_full_batches(
  num_train_steps, num_epochs, expected
):
  config = tiny.get_config()
  config.num_train_steps, config.num_epochs, config.batch_size = num_train_steps, num_epochs, 64
  assert train_step_lib.total_train_steps(config, 1437) == expected


@pytest.mark.parametrize(('ema_decay', 'has_ema'), [(0.0, False), (1e-4, True), (0.9999, True)])
def test_the_state_holds_an_ema_copy_of_the_parameters_only_when_ema_decay_is_set(
  ema_decay, has_ema
):
  config = tiny.get_config()
  config.ema_decay = ema_decay
  model = networks.create_model(config)
  tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 10, 100))
  mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
  _, abstract = train_step_lib.abstract_train_state(config, model, tx, mesh)
  if has_ema:
    assert jax.tree.structure(abstract.ema_params) == jax.tree.structure(abstract.params)
  else:
    assert abstract.ema_params is None


class _ScaledLogits:
  """A model whose logits are `scale` x given logits: what the step makes of them is the test."""

  dtype = 'float32'

  def __init__(self, logits):
    self.logits = logits

  def apply(self, variables, images, train, mutable, rngs):
    assert train and mutable == ['batch_stats'] and images.dtype == np.float32
    return variables['params']['scale'] * self.logits, {}


@pytest.mark.parametrize('soft', [False, True])
def test_step_metrics_are_the_loss_top1_grad_norm_and_rate_of_its_batch(soft):
  """Loss (label-smoothed cross-entropy), top-1 against the hard labels (argmax of mixed ones),
  gradient norm and learning rate of one step, computed here with NumPy."""
  rng = np.random.default_rng(0)
  batch, classes, smoothing = 6, 4, 0.1
  logits = rng.normal(size=(batch, classes)).astype(np.float32) * 3
  hard = rng.integers(0, classes, batch)
  hard[:2] = logits[:2].argmax(-1)  # At least two rows right.
  if soft:  # Mixed targets: 0.7 of the labelled class, 0.3 of another.
    labels = 0.7 * np.eye(classes)[hard] + 0.3 * np.eye(classes)[(hard + 1) % classes]
    labels = labels.astype(np.float32)
  else:
    labels = hard.astype(np.int32)
  config = tiny.get_config()
  config.label_smoothing = smoothing
  params = {'scale': jnp.ones((), jnp.float32)}
  tx = optax.sgd(0.5)
  state = train_step_lib.TrainState(
    step=jnp.array(2, jnp.int32),
    params=params,
    batch_stats={},
    opt_state=tx.init(params),
    ema_params=None,
  )
  images = np.zeros((batch, 8, 8, 3), np.uint8)
  new, metrics = train_step_lib.train_step(
    state,
    {'image': images, 'label': labels},
    model=_ScaledLogits(logits),
    tx=tx,
    schedule=lambda step: 0.25 + step,
    config=config,
  )

  targets = (np.eye(classes)[hard] if not soft else labels) * (1 - smoothing) + smoothing / classes
  shifted = logits - logits.max(-1, keepdims=True)
  probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
  loss = -(targets * np.log(probs)).sum(-1).mean()
  grad = ((probs - targets) * logits).sum(-1).mean()  # d loss / d scale at scale 1.
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['top1'], 100 * np.mean(logits.argmax(-1) == hard), rtol=1e-6)
  np.testing.assert_allclose(metrics['grad_norm'], abs(grad), rtol=1e-4)
  assert float(metrics['lr']) == 2.25 and bool(metrics['state_finite'])
  assert int(new.step) == 3
  np.testing.assert_allclose(new.params['scale'], 1 - 0.5 * grad, rtol=1e-5)


def test_build_schedules_the_runs_epochs_of_its_train_split():
  """1437 examples in global batches of 64: 22 steps an epoch, 3 epochs of 66 steps, a warmup of
  one epoch to 0.1 x 64 / 256, then a cosine to zero."""
  config = tiny.get_config()
  config.num_train_steps, config.num_epochs, config.batch_size = 0, 3.0, 64
  config.optimizer.learning_rate, config.optimizer.warmup_epochs = 0.1, 1.0
  model, tx, schedule, num_steps = train_step_lib.build(config, 1437)
  assert num_steps == 66 and model.num_classes == config.num_classes
  peak = 0.1 * 64 / 256
  for step, lr in {0: 0.0, 11: peak / 2, 22: peak, 44: peak / 2, 66: 0.0}.items():
    assert float(schedule(step)) == pytest.approx(lr, abs=1e-8), step
  params = {'w': jnp.ones(3)}
  updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params)
  assert updates['w'].shape == (3,)


def test_dropout_masks_differ_from_step_to_step_and_repeat_on_a_rerun_of_a_step():
  """The masks are drawn from the seed and the step: a resumed step draws the masks the
  unbroken run drew, and no two steps draw the same."""
  config = tiny.get_config()
  config.model.dropout_rate = 0.5
  step, state, mesh = _step_and_state(config)
  batch = sharding.shard_batch(steps.random_batch(config), mesh)
  losses = {}
  for at, again in ((0, False), (1, False), (0, True)):
    copy = jax.tree.map(jnp.copy, state).replace(step=jnp.asarray(at, state.step.dtype))
    losses[at, again] = float(step(copy, batch)[1]['loss'])
  assert losses[0, False] == losses[0, True]
  assert losses[0, False] != losses[1, False]
