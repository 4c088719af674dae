"""Every config value with a valid range, checked in one line naming it before anything runs.

`RANGES` is the table of scalar fields; the rules that tie fields together (batch vs devices,
heads vs widths, the attention window vs the halo) follow it. halonet/models/checks.py holds the
architecture's own rules and is called from here, so a run needs only `validate_config`.
"""

import numbers
import re

import jax
import ml_collections

from halonet import errors
from halonet import sharding
from halonet.evaluators import specs as evaluator_specs
from halonet.models import checks as model_checks
from halonet.models import halonet as model_lib
from halonet.models import paper
from halonet.train import optim

# Field -> interval; '[' and ']' include the bound, '(' and ')' exclude it. NaN is never inside.
RANGES = {
  'image_size': f'[{model_lib.MIN_IMAGE_SIZE}, inf)',
  'num_classes': '[1, inf)',
  'model.block_size': '[1, inf)',
  'model.halo_size': '[0, inf)',
  'model.value_ratio': '(0, inf)',
  'model.bottleneck_ratio': '(0, inf)',
  'model.final_width': '[0, inf)',
  'model.mask_window': '[0, inf)',
  'model.stochastic_depth_rate': '[0, 1)',
  'model.dropout_rate': '[0, 1)',
  'input.crop_fraction': '(0, 1]',
  'input.randaugment_layers': '[0, inf)',
  'input.randaugment_magnitude': '[0, 30]',
  'input.mixup_alpha': '[0, inf)',
  'input.cutmix_alpha': '[0, inf)',
  'input.shuffle_buffer': '[1, inf)',
  'num_epochs': '[0, inf)',
  'optimizer.learning_rate': '(0, inf)',
  'optimizer.warmup_epochs': '[0, inf)',
  'optimizer.momentum': '[0, 1)',
  'optimizer.b1': '[0, 1)',
  'optimizer.b2': '[0, 1)',
  'optimizer.weight_decay': '[0, inf)',
  'optimizer.grad_clip_norm': '[0, inf)',
  'label_smoothing': '[0, 1)',
  'ema_decay': '[0, 1)',
  'log_every_steps': '[1, inf)',
  'eval_every_steps': '[1, inf)',
  'checkpoint_every_steps': '[1, inf)',
  'keep_checkpoints': '[1, inf)',
  'storage_outage_minutes': '(0, inf)',
  'fewshot_seeds': '[1, inf)',
  'fewshot_l2': '(0, inf)',
  'seed': '[0, 4294967295]',  # numpy's and JAX's seeds are unsigned 32-bit.
}
# Sequences whose every entry must be a positive count.
POSITIVE_ENTRIES = (
  'model.widths',
  'model.stage_depths',
  'model.num_heads',
  'model.block_sizes',
  'model.halo_sizes',
  'fewshot_shots',
)


def field(config: ml_collections.ConfigDict, name: str):
  """The value of dotted field `name`."""
  for part in name.split('.'):
    config = config[part]
  return config


def _inside(value: float, interval: str) -> bool:
  low, high = (float(bound) for bound in interval[1:-1].split(','))
  above = value >= low if interval[0] == '[' else value > low
  below = value <= high if interval[-1] == ']' else value < high
  return above and below  # Both False for NaN, as every comparison with it is.


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Each field of RANGES inside its interval, each POSITIVE_ENTRIES entry a whole number >= 1
  (or >= 0 for halo sizes), and `variant`, when shaped like a paper row, one of the paper's rows."""
  for name, interval in RANGES.items():
    value = field(config, name)
    if not _inside(float(value), interval):
      raise errors.ConfigError(f'config.{name}={value} must be in {interval}')
  for name in POSITIVE_ENTRIES:
    values = tuple(field(config, name))
    smallest = 0 if name == 'model.halo_sizes' else 1
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
      raise errors.ConfigError(f'config.{name}={values}: every entry must be a whole number')
    if any(v < smallest for v in values):
      raise errors.ConfigError(f'config.{name}={values}: every entry must be >= {smallest}')
  low, high = config.input.crop_area_range
  if not 0.0 < low <= high <= 1.0:
    raise errors.ConfigError(
      f'config.input.crop_area_range={(low, high)} must satisfy 0 < low <= high <= 1'
    )
  for name, fits, rule in (
    ('input.pixel_mean', lambda v: 0.0 <= v <= 1.0, 'in [0, 1]'),
    ('input.pixel_std', lambda v: v > 0.0, '> 0'),
  ):
    values = tuple(field(config, name))
    if len(values) != 3 or not all(fits(v) for v in values):
      raise errors.ConfigError(f'config.{name}={values} must be 3 RGB values {rule} (0-1 units)')
  profile = tuple(config.profile_steps)
  if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1]):
    raise errors.ConfigError(
      f'config.profile_steps={profile} must be () or (first, last) with 1 <= first <= last'
    )
  if re.fullmatch(r'h\d+', config.variant) and config.variant not in paper.VARIANTS:
    raise errors.ConfigError(
      f'config.variant={config.variant!r} is not a row of the paper; '
      f'expected one of {list(paper.VARIANTS)}'
    )


def validate_values(config: ml_collections.ConfigDict) -> None:
  """Everything that does not depend on the machine: what a sweep checks before launching."""
  check_ranges(config)
  model_checks.validate_config(config)
  evaluator_specs.parse_all(config.evals)
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise errors.ConfigError(
      f'config.optimizer.name={config.optimizer.name!r} is not one of {optim.OPTIMIZERS}'
    )
  if config.trainable not in optim.TRAINABLE:
    raise errors.ConfigError(
      f'config.trainable={config.trainable!r} is not one of {optim.TRAINABLE}'
    )
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise errors.ConfigError(
      f'config.num_epochs={config.num_epochs} must be > 0 when num_train_steps <= 0'
    )


def validate_config(
  config: ml_collections.ConfigDict,
  num_devices: int | None = None,
  process_count: int | None = None,
) -> None:
  """Rejects bad values with one line naming them, before anything is built or compiled."""
  validate_values(config)
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  data_size, spatial_size = sharding.resolve_mesh_shape(config.mesh_shape, num_devices)
  if config.image_size % spatial_size:
    raise errors.ConfigError(
      f'config.image_size={config.image_size} does not split into {spatial_size} equal bands '
      f'of rows (the spatial axis of config.mesh_shape={tuple(config.mesh_shape)})'
    )
  for name in ('batch_size', 'eval_batch_size'):
    value = config[name]
    if value <= 0 or value % data_size:
      raise errors.ConfigError(
        f'config.{name}={value} is not a positive multiple of the {data_size} '
        f'devices on the mesh data axis'
      )
    if value % process_count:
      raise errors.ConfigError(
        f'config.{name}={value} is not divisible by the {process_count} processes'
      )
