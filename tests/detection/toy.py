"""A toy Mask R-CNN on 64 px digit scenes (configs/tiny.py's backbone, narrow heads): what the
detection model's tests build and train."""

import jax
import jax.numpy as jnp
import ml_collections

from configs import detection as detection_configs
from configs import tiny
from halonet.data import digit_scenes
from halonet.data import preprocessing
from halonet.detection import model as model_lib
from halonet.models import keys
from halonet.models import networks

SIZE = 64
DETECTOR = model_lib.MaskRCNN(
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
GT_KEYS = ('boxes', 'classes', 'mask_crops', 'valid')
# configs/detection.py:digits at the toy's sizes (tiny.py's backbone, DETECTOR's heads): what the
# tests of whole detection runs train.
RUN_FIELDS = {
  'model.widths': (8, 16, 16, 32),
  'model.num_heads': (2, 2, 2, 2),
  'model.block_size': 4,
  'model.halo_size': 1,
  'detection.fpn_width': 16,
  'detection.rpn_pre_nms_top_n': (64, 64),
  'detection.box_hidden': 32,
  'batch_size': 8,  # One image per device of the tests' 8.
  'eval_batch_size': 128,
  'num_train_steps': 6,
  'log_every_steps': 2,
}


def run_config(**fields) -> ml_collections.ConfigDict:
  """configs/detection.py:digits with RUN_FIELDS and then `fields` (dotted names as keys)."""
  config = detection_configs.get_config('digits')
  config.update_from_flattened_dict({**RUN_FIELDS, **fields})
  return config


def run_flags(**fields) -> list[str]:
  """run_config's fields as train.py's flags."""
  flags = ['--config=configs/detection.py:digits']
  return flags + [f'--config.{k}={v}' for k, v in {**RUN_FIELDS, **fields}.items()]


def parts(batch: int):
  """(images [batch, 64, 64, 3] normalised, image sizes, ground truth, params {'backbone',
  'detector'}, stages(backbone params, images), losses(params, images, sizes, gt, key))."""
  config = tiny.get_config()
  config.image_size = SIZE
  backbone = networks.create_model(config)
  data = digit_scenes.batch('train', range(batch), size=SIZE)
  images = preprocessing.normalize_images(jnp.asarray(data['image']), config.input, jnp.float32)
  backbone_vars = jax.jit(lambda k: backbone.init(k, images[:1], train=False))(jax.random.key(0))

  def stages(backbone_params, images):
    variables = {'params': backbone_params, 'batch_stats': backbone_vars['batch_stats']}
    _, sown = backbone.apply(variables, images, train=False, mutable=[keys.FEATURES])
    return [sown[keys.FEATURES][f'stage{i}'][0] for i in range(1, 5)]

  def losses(params, images, sizes, gt, key):
    return DETECTOR.apply(
      {'params': params['detector']},
      stages(params['backbone'], images),
      sizes,
      gt,
      key,
      method=model_lib.MaskRCNN.losses,
    )

  sizes = jnp.full((batch, 2), SIZE)
  detector_vars = jax.jit(DETECTOR.init)(
    jax.random.key(1), stages(backbone_vars['params'], images), sizes
  )
  params = {'backbone': backbone_vars['params'], 'detector': detector_vars['params']}
  gt = {k: jnp.asarray(data[k]) for k in GT_KEYS}
  return images, sizes, gt, params, stages, losses
