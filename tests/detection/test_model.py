"""Mask R-CNN end to end on the offline digit scenes, at toy widths: the five losses are finite
and fall when a few steps fit a small batch (backbone included, its BatchNorm frozen), and
inference gives static-shape detections inside the image."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from halonet.data import digit_scenes
from halonet.data import preprocessing
from halonet.detection import model as model_lib
from halonet.models import keys
from halonet.models import networks

SIZE = 64


@pytest.fixture(scope='module')
def parts():
  config = tiny.get_config()
  config.image_size = SIZE
  backbone = networks.create_model(config)
  detector = model_lib.MaskRCNN(
    num_classes=digit_scenes.NUM_CLASSES,
    fpn_width=16,
    anchor_sizes=(8, 16, 32, 64, 128),
    rpn_batch_per_image=64,
    rpn_pre_nms_top_n=(64, 64),
    rpn_post_nms_top_n=(64, 32),
    roi_batch_per_image=32,
    box_hidden=32,
    mask_width=16,
    max_detections=10,
  )
  data = digit_scenes.batch('train', range(4), size=SIZE)
  images = preprocessing.normalize_images(jnp.asarray(data['image']), config.input, jnp.float32)
  backbone_vars = backbone.init(jax.random.key(0), images[:1], train=False)

  def stages(backbone_params, images):
    variables = {'params': backbone_params, 'batch_stats': backbone_vars['batch_stats']}
    _, sown = backbone.apply(variables, images, train=False, mutable=[keys.FEATURES])
    return [sown[keys.FEATURES][f'stage{i}'][0] for i in range(1, 5)]

  sizes = jnp.full((4, 2), SIZE)
  detector_params = jax.jit(detector.init)(
    jax.random.key(1), stages(backbone_vars['params'], images), sizes
  )
  return detector, stages, images, sizes, data, backbone_vars['params'], detector_params['params']


@pytest.mark.slow
def test_a_few_steps_on_a_small_batch_lower_every_loss(parts):
  detector, stages, images, sizes, data, backbone_params, detector_params = parts
  gt = {k: jnp.asarray(data[k]) for k in ('boxes', 'classes', 'mask_crops', 'valid')}

  def losses(params, key):
    return detector.apply(
      {'params': params['detector']},
      stages(params['backbone'], images),
      sizes,
      gt,
      key,
      method=model_lib.MaskRCNN.losses,
    )

  params = {'backbone': backbone_params, 'detector': detector_params}
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
  last = {k: float(v) for k, v in losses(params, jax.random.key(0)).items()}
  assert set(first) == {'rpn_objectness', 'rpn_box', 'classifier', 'box', 'mask'}
  assert all(np.isfinite(v) for v in first.values()), first
  assert sum(last.values()) < 0.5 * sum(first.values()), (first, last)
  # The box loss starts near 0 (only the ground truth's own rows are positives until the RPN
  # finds objects), so it is not among those that must fall.
  for name in ('rpn_objectness', 'rpn_box', 'classifier', 'mask'):
    assert last[name] < first[name], (name, first, last)


def test_detections_have_static_shapes_and_stay_in_the_image(parts):
  detector, stages, images, sizes, _, backbone_params, detector_params = parts
  found = jax.jit(lambda p, b: detector.apply({'params': p}, stages(b, images), sizes))(
    detector_params, backbone_params
  )
  assert found['boxes'].shape == (4, 10, 4) and found['masks'].shape == (4, 10, 28, 28)
  boxes = np.asarray(found['boxes'])
  assert (boxes >= 0).all() and (boxes <= SIZE).all()
  masks = np.asarray(found['masks'])
  assert ((masks >= 0) & (masks <= 1)).all()
  assert set(np.asarray(found['classes'])[np.asarray(found['valid'])]) <= set(range(1, 11))
