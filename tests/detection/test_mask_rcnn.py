"""Mask R-CNN end to end on the offline digit scenes, at toy widths: the five losses are finite
and fall when a few steps fit a small batch (backbone included, its BatchNorm frozen), and
inference gives static-shape detections inside the image."""

import math

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from halonet import sharding
from tests import hlo
from tests.detection import toy


@pytest.fixture(scope='module')
def parts():
  return toy.parts(4)


@pytest.mark.slow
def test_a_few_steps_on_a_small_batch_lower_every_loss(parts):
  images, sizes, gt, params, _, loss_terms = parts
  losses = lambda p, key: loss_terms(p, images, sizes, gt, key)
  tx = optax.adam(3e-3)
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    (total, each), grads = jax.value_and_grad(
      lambda p: (lambda d: (sum(d.values()), d))(losses(p, key)), has_aux=True
    )(params)
    updates, state = tx.update(grads, state)
    return optax.apply_updates(params, updates), state, each

  first = None
  for i in range(20):
    params, state, each = step(params, state, jax.random.key(i))
    first = first or {k: float(v) for k, v in each.items()}
  _, _, last = step(params, state, jax.random.key(0))  # The losses before that update.
  last = {k: float(v) for k, v in last.items()}
  assert set(first) == {'rpn_objectness', 'rpn_box', 'classifier', 'box', 'mask'}
  assert all(np.isfinite(v) for v in first.values()), first
  assert sum(last.values()) < 0.5 * sum(first.values()), (first, last)
  # The box loss starts near 0 (only the ground truth's own rows are positives until the RPN
  # finds objects), so it is not among those that must fall.
  for name in ('rpn_objectness', 'rpn_box', 'classifier', 'mask'):
    assert last[name] < first[name], (name, first, last)


def test_detections_have_static_shapes_and_stay_in_the_image(parts):
  images, sizes, _, params, stages, _ = parts
  found = jax.jit(
    lambda p: toy.DETECTOR.apply({'params': p['detector']}, stages(p['backbone'], images), sizes)
  )(params)
  assert found['boxes'].shape == (4, 10, 4) and found['masks'].shape == (4, 10, 28, 28)
  boxes = np.asarray(found['boxes'])
  assert (boxes >= 0).all() and (boxes <= toy.SIZE).all()
  masks = np.asarray(found['masks'])
  assert ((masks >= 0) & (masks <= 1)).all()
  assert set(np.asarray(found['classes'])[np.asarray(found['valid'])]) <= set(range(1, 11))


def test_the_train_step_on_8_devices_only_all_reduces_parameter_sized_tensors():
  """Data parallelism: each device's images stay on it (no feature map is gathered); only
  gradients and the loss normalisers are all-reduced."""
  images, sizes, gt, params, _, loss_terms = toy.parts(8)
  mesh = sharding.create_mesh((-1, 1), jax.devices()[:8])
  data = jax.sharding.NamedSharding(mesh, P('data'))
  total = lambda p, *batch: sum(loss_terms(p, *batch).values())
  grad = jax.jit(
    sharding.traced_within(mesh, jax.grad(total)),  # The mesh the backbone's layers shard over.
    in_shardings=(sharding.replicated(mesh), data, data, data, sharding.replicated(mesh)),
    out_shardings=sharding.replicated(mesh),
  )
  compiled = grad.lower(params, images, sizes, gt, jax.random.key(0)).compile()
  collectives = hlo.hlo_ops(compiled.as_text(), hlo.COLLECTIVES)
  assert {op for op, _ in collectives} == {'all-reduce'}, collectives
  reduced = [dims for _, shape in collectives for dims in hlo.array_dims(shape)]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  assert sum(math.prod(dims) for dims in reduced) < 1.5 * num_params
