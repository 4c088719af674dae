"""The optimizer's updates over two steps, clipping, head-only training and the warmup's edges,
each against arithmetic written here from the rules (SGDW with Nesterov momentum, AdamW),
on a small hand-made parameter tree."""

import math

import jax
import numpy as np
import pytest

from configs import tiny
from halonet.models.keys import CLASSIFIER
from halonet.train import optim

LR, WD = 0.1, 0.01


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  leaf = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {
    'stage1_block0': {'Dense_0': {'kernel': leaf(4, 3)}, 'BatchNorm_0': {'scale': leaf(3)}},
    CLASSIFIER: {'kernel': leaf(3, 2), 'bias': leaf(2)},
  }


def _decayed(path) -> bool:
  return path[-1].key == 'kernel'  # Matrices; not BN scales or biases.


def _config(name: str, **optimizer):
  config = tiny.get_config()
  config.batch_size = 256  # The peak rate is the configured one.
  config.optimizer.update(name=name, learning_rate=LR, warmup_epochs=0.0, weight_decay=WD)
  config.optimizer.update(optimizer)
  return config


def _steps(config, grads_per_step, params):
  """Parameters after applying one update per gradient tree, from a fresh optimizer."""
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=1000, total_steps=1000)
  tx = optim.create_optimizer(config, schedule)
  state = tx.init(params)
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
  return params


def _lr(step: int, total: int = 1000) -> float:
  """The cosine schedule without warmup, by hand."""
  return LR * 0.5 * (1 + math.cos(math.pi * step / total))


def _close(got, want):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6), got, want)


def test_two_sgd_steps_follow_nesterov_momentum_then_decoupled_decay():
  """trace_t = g_t + m trace_{t-1}; the step is lr_t (g_t + m trace_t + wd p)."""
  m = 0.5
  config = _config('sgd', momentum=m)
  p0, g1, g2 = _params(0), _params(1), _params(2)
  got = _steps(config, [g1, g2], p0)

  def by_hand(path, p, a, b):
    decay = WD if _decayed(path) else 0.0
    p1 = p - _lr(0) * (a + m * a + decay * p)
    trace = b + m * a
    return p1 - _lr(1) * (b + m * trace + decay * p1)

  _close(got, jax.tree_util.tree_map_with_path(by_hand, p0, g1, g2))


def test_two_adamw_steps_use_the_configured_betas():
  """Betas away from optax's defaults: bias-corrected moments, plus lr * wd * p."""
  b1, b2, eps = 0.5, 0.8, 1e-8
  config = _config('adamw', b1=b1, b2=b2)
  p0, g1, g2 = _params(0), _params(1), _params(2)
  got = _steps(config, [g1, g2], p0)

  def by_hand(path, p, a, b):
    decay = WD if _decayed(path) else 0.0
    mu, nu = (1 - b1) * a, (1 - b2) * a**2
    p1 = p - _lr(0) * ((mu / (1 - b1)) / (np.sqrt(nu / (1 - b2)) + eps) + decay * p)
    mu, nu = b1 * mu + (1 - b1) * b, b2 * nu + (1 - b2) * b**2
    step = (mu / (1 - b1**2)) / (np.sqrt(nu / (1 - b2**2)) + eps)
    return p1 - _lr(1) * (step + decay * p1)

  _close(got, jax.tree_util.tree_map_with_path(by_hand, p0, g1, g2))


@pytest.mark.parametrize('clip', [0.5, 1.5, 4.0])
def test_clipping_rescales_gradients_over_the_global_norm_only(clip):
  """With clip c and global norm |g| = 2: g * min(1, c / |g|) enters SGD's first step."""
  grads = _params(1)
  norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in jax.tree.leaves(grads)))
  grads, norm = jax.tree.map(lambda g: g * np.float32(2 / norm), grads), 2.0
  config = _config('sgd', grad_clip_norm=clip)
  p0 = _params(0)
  got = _steps(config, [grads], p0)
  factor = min(1.0, clip / norm)
  m = config.optimizer.momentum

  def by_hand(path, p, g):
    return p - _lr(0) * ((1 + m) * g * factor + (WD if _decayed(path) else 0.0) * p)

  _close(got, jax.tree_util.tree_map_with_path(by_hand, p0, grads))


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_head_only_training_moves_the_classifier_alone(name):
  config = _config(name)
  config.trainable = 'head'
  p0 = _params(0)
  got = _steps(config, [_params(1), _params(2)], p0)
  _close(got['stage1_block0'], p0['stage1_block0'])  # Decay would move it too.
  everything = _config(name)
  _close(got[CLASSIFIER], _steps(everything, [_params(1), _params(2)], p0)[CLASSIFIER])
  assert not np.allclose(got[CLASSIFIER]['kernel'], p0[CLASSIFIER]['kernel'])


@pytest.mark.parametrize(
  'warmup_epochs, step, want',
  [
    (0.1, 0, 0.0),  # One warmup step (0.1 epoch of 10 steps): step 0 is still at zero.
    (0.1, 1, LR),
    (0.25, 2, LR),  # round(2.5) = 2 warmup steps.
    (0.25, 1, LR / 2),
    (20.0, 50, LR / 2),  # Warmup longer than the run: it stops at the last step.
    (20.0, 100, LR),
  ],
)
def test_warmup_steps_round_and_never_outlast_the_run(warmup_epochs, step, want):
  config = _config('sgd', warmup_epochs=warmup_epochs)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  assert float(schedule(step)) == pytest.approx(want, abs=1e-7)


def test_an_unknown_optimizer_is_refused_by_name():
  with pytest.raises(ValueError, match="name='lamb' is not one of"):
    optim.create_optimizer(_config('lamb'), optim.learning_rate_schedule(_config('sgd'), 1, 1))
