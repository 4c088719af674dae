"""A detection config's values, each checked in one line naming it before anything is built:
the backbone's and the run's fields as classification checks them, then Mask R-CNN's own."""

import jax
import ml_collections

from halonet import errors
from halonet import sharding
from halonet.detection import data as data_lib
from halonet.detection import model as model_lib
from halonet.train import config_checks

TASKS = ('classification', 'detection')
_COUNTS = (
  'fpn_width',
  'rpn_batch_per_image',
  'box_hidden',
  'mask_width',
  'max_detections',
  'max_objects',
)


def validate_task(config: ml_collections.ConfigDict) -> None:
  if config.task not in TASKS:
    raise errors.ConfigError(f'config.task={config.task!r} is not one of {list(TASKS)}')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects what a detection run cannot use, before anything is read or compiled."""
  validate_task(config)
  config_checks.validate_config(config)
  d = config.detection
  for name in _COUNTS:
    if d[name] < 1:
      raise errors.ConfigError(f'config.detection.{name}={d[name]} must be >= 1')
  # A quarter of the sampled proposals may be positives: at least one must fit.
  if d.roi_batch_per_image < 4:
    raise errors.ConfigError(
      f'config.detection.roi_batch_per_image={d.roi_batch_per_image} must be >= 4'
    )
  sizes = tuple(d.anchor_sizes)
  if len(sizes) != len(model_lib.STRIDES) or min(sizes) <= 0:
    raise errors.ConfigError(
      f'config.detection.anchor_sizes={sizes} must be {len(model_lib.STRIDES)} positive sides '
      '(P2 ... P6)'
    )
  ratios = tuple(d.anchor_ratios)
  if not ratios or min(ratios) <= 0:
    raise errors.ConfigError(f'config.detection.anchor_ratios={ratios} must be positive ratios')
  for name in ('rpn_pre_nms_top_n', 'rpn_post_nms_top_n'):
    pair = tuple(d[name])
    if len(pair) != 2 or min(pair) < 1:
      raise errors.ConfigError(
        f'config.detection.{name}={pair} must be (training, inference), both >= 1'
      )
  low, high = d.scale_range
  if not 0 < low <= high:
    raise errors.ConfigError(
      f'config.detection.scale_range={(low, high)} must satisfy 0 < low <= high'
    )
  coarsest = model_lib.STRIDES[-1]
  if config.image_size % coarsest:
    raise errors.ConfigError(
      f'config.image_size={config.image_size} must be a multiple of {coarsest} for detection '
      '(the stride of P6, so every level covers the canvas whole)'
    )
  if config.input.dataset not in data_lib.DATASETS:
    raise errors.ConfigError(
      f'config.input.dataset={config.input.dataset!r} is not a detection dataset; expected one '
      f'of {list(data_lib.DATASETS)}'
    )
  for name, allowed, why in (
    ('trainable', 'all', 'the heads and the backbone train together'),
    ('ema_decay', 0.0, 'detection keeps no EMA'),
    ('evals', (), 'config.evals score classifiers'),
    ('input.mixup_alpha', 0.0, 'images are not mixed in detection'),
    ('input.cutmix_alpha', 0.0, 'images are not mixed in detection'),
    ('input.randaugment_layers', 0, 'detection augments by scale jitter and flips'),
  ):
    value = config_checks.field(config, name)
    if (tuple(value) if isinstance(value, (list, tuple)) else value) != allowed:
      raise errors.ConfigError(f'config.{name}={value!r} must be {allowed!r}: {why}')
  _, spatial = sharding.resolve_mesh_shape(config.mesh_shape, jax.device_count())
  if spatial != 1:
    raise errors.ConfigError(
      f'config.mesh_shape={tuple(config.mesh_shape)}: detection splits images over the data '
      'axis only; use (-1, 1)'
    )
