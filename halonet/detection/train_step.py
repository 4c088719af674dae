"""Mask R-CNN on a backbone of this codebase, as one state and two jitted functions: the train
step (the five losses summed, one optimizer update) and inference. The state is the classifier's
TrainState, its params {'backbone', 'detector'} and its BatchNorm statistics the backbone's,
frozen (train=False), as Mask R-CNN fine-tunes a pretrained backbone; so Orbax, resuming and
restoring treat a detection run as any other."""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from halonet import sharding
from halonet.data import preprocessing
from halonet.detection import data as data_lib
from halonet.detection import model as model_lib
from halonet.models import keys
from halonet.train import step as train_step_lib

GT_KEYS = ('boxes', 'classes', 'mask_crops', 'valid')
TRAIN_BATCH_KEYS = ('image', 'image_size', *GT_KEYS)
INFER_BATCH_KEYS = ('image', 'image_size')
LOSSES = ('rpn_objectness', 'rpn_box', 'classifier', 'box', 'mask')


@dataclasses.dataclass(frozen=True)
class Detector:
  """The backbone (a classification network, its classifier unused) and Mask R-CNN's heads."""

  backbone: nn.Module
  heads: model_lib.MaskRCNN

  def stages(self, params: Any, batch_stats: Any, images: jax.Array) -> list[jax.Array]:
    """The backbone's four stages (strides 4-32), its BatchNorm frozen."""
    variables = {'params': params, 'batch_stats': batch_stats}
    _, sown = self.backbone.apply(variables, images, train=False, mutable=[keys.FEATURES])
    return [sown[keys.FEATURES][f'stage{i}'][0] for i in range(1, 5)]


def heads_of(config: ml_collections.ConfigDict, dtype: Any) -> model_lib.MaskRCNN:
  """config.detection's Mask R-CNN for config.num_classes object classes."""
  d = config.detection
  return model_lib.MaskRCNN(
    num_classes=config.num_classes,
    fpn_width=d.fpn_width,
    anchor_sizes=tuple(float(s) for s in d.anchor_sizes),
    anchor_ratios=tuple(float(r) for r in d.anchor_ratios),
    rpn_batch_per_image=d.rpn_batch_per_image,
    rpn_pre_nms_top_n=tuple(d.rpn_pre_nms_top_n),
    rpn_post_nms_top_n=tuple(d.rpn_post_nms_top_n),
    roi_batch_per_image=d.roi_batch_per_image,
    box_hidden=d.box_hidden,
    mask_width=d.mask_width,
    max_detections=d.max_detections,
    dtype=dtype,
  )


def abstract_state(
  config: ml_collections.ConfigDict,
  detector: Detector,
  tx: optax.GradientTransformation,
  mesh: Mesh,
) -> tuple[Callable[[jax.Array], train_step_lib.TrainState], train_step_lib.TrainState]:
  """The init function and its output's shapes, replicated on `mesh`."""
  size = config.image_size

  def init(rng: jax.Array) -> train_step_lib.TrainState:
    backbone_rng, heads_rng = jax.random.split(rng)
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = detector.backbone.init(backbone_rng, images, train=False)
    stages = detector.stages(variables['params'], variables['batch_stats'], images)
    heads = detector.heads.init(heads_rng, stages, jnp.full((1, 2), size))
    params = {'backbone': variables['params'], 'detector': heads['params']}
    return train_step_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(params),
      ema_params=None,
    )

  replicated = sharding.replicated(mesh)
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
    jax.eval_shape(init, jax.random.key(0)),
  )
  return init, abstract


def train_batch_specs(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The global train batch's shapes (data.py's `prepared` examples, stacked)."""
  batch, size, objects = config.batch_size, config.image_size, config.detection.max_objects
  crop = data_lib.MASK_CROP
  return {
    'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
    'image_size': jax.ShapeDtypeStruct((batch, 2), jnp.int32),
    'boxes': jax.ShapeDtypeStruct((batch, objects, 4), jnp.float32),
    'classes': jax.ShapeDtypeStruct((batch, objects), jnp.int32),
    'mask_crops': jax.ShapeDtypeStruct((batch, objects, crop, crop), jnp.float32),
    'valid': jax.ShapeDtypeStruct((batch, objects), jnp.bool_),
  }


def train_step(
  state: train_step_lib.TrainState,
  batch: dict[str, jax.Array],
  *,
  detector: Detector,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  config: ml_collections.ConfigDict,
) -> tuple[train_step_lib.TrainState, dict[str, jax.Array]]:
  """One update on the global batch; the samplers' draws are a function of (seed, step), so a
  resumed run replays them exactly."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), state.step)
  images = preprocessing.normalize_images(
    batch['image'], config.input, jnp.dtype(detector.heads.dtype)
  )
  gt = {k: batch[k] for k in GT_KEYS}

  def loss_fn(params):
    stages = detector.stages(params['backbone'], state.batch_stats, images)
    losses = detector.heads.apply(
      {'params': params['detector']},
      stages,
      batch['image_size'],
      gt,
      key,
      method=model_lib.MaskRCNN.losses,
    )
    return sum(losses.values()), losses

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  metrics = {
    'loss': loss,
    **losses,
    'grad_norm': optax.tree.norm(grads),
    'lr': schedule(state.step),
    'state_finite': train_step_lib.all_finite(new_state),
  }
  return new_state, metrics


def make_train_step(
  config: ml_collections.ConfigDict,
  detector: Detector,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  mesh: Mesh,
  state_shardings: Any,
):
  """Jitted step: state replicated and donated, each image and its objects on one device."""
  step = functools.partial(train_step, detector=detector, tx=tx, schedule=schedule, config=config)
  return train_step_lib.jit_step(step, mesh, state_shardings, TRAIN_BATCH_KEYS)


def make_infer(config: ml_collections.ConfigDict, detector: Detector, mesh: Mesh):
  """Jitted inference: (params, batch_stats, batch) -> each image's detections (MaskRCNN.detect),
  replicated so that every process can score them."""

  def infer(params, batch_stats, batch):
    images = preprocessing.normalize_images(
      batch['image'], config.input, jnp.dtype(detector.heads.dtype)
    )
    stages = detector.stages(params['backbone'], batch_stats, images)
    found = detector.heads.apply(
      {'params': params['detector']}, stages, batch['image_size'], method=model_lib.MaskRCNN.detect
    )
    return {
      k: v.astype(jnp.float32) if k in ('boxes', 'scores', 'masks') else v for k, v in found.items()
    }

  replicated = sharding.replicated(mesh)
  return jax.jit(
    sharding.traced_within(mesh, infer),
    in_shardings=(replicated, replicated, sharding.batch_shardings(mesh, INFER_BATCH_KEYS)),
    out_shardings=replicated,
  )
