"""Every bad config value fails in one line naming it, before anything is read or compiled."""

import math

import pytest

from configs import tiny
from halonet.train import config_checks

NAN, INF = math.nan, math.inf
# One or more bad values for every field with a range, written here, not read from RANGES.
BAD_VALUES = [
  ('image_size', 16),
  ('num_classes', 0),
  ('model.block_size', 0),
  ('model.halo_size', -1),
  ('model.value_ratio', 0.0),
  ('model.bottleneck_ratio', -1.0),
  ('model.final_width', -8),
  ('model.mask_window', -1),
  ('model.stochastic_depth_rate', 1.0),
  ('model.dropout_rate', NAN),
  ('input.crop_fraction', 1.5),
  ('input.randaugment_layers', -1),
  ('input.randaugment_magnitude', 31),
  ('input.mixup_alpha', -0.2),
  ('input.cutmix_alpha', NAN),
  ('input.shuffle_buffer', 0),
  ('num_epochs', INF),
  ('optimizer.learning_rate', NAN),
  ('optimizer.learning_rate', -0.1),
  ('optimizer.learning_rate', 0.0),
  ('optimizer.warmup_epochs', -1.0),
  ('optimizer.momentum', 1.0),
  ('optimizer.b1', -0.1),
  ('optimizer.b2', 1.0),
  ('optimizer.weight_decay', NAN),
  ('optimizer.grad_clip_norm', -1.0),
  ('label_smoothing', 1.0),
  ('ema_decay', 1.5),
  ('log_every_steps', 0),
  ('eval_every_steps', -5),
  ('checkpoint_every_steps', 0),
  ('keep_checkpoints', 0),
  ('storage_outage_minutes', 0),
  ('fewshot_seeds', 0),
  ('fewshot_l2', 0.0),
  ('seed', -1),
  ('seed', 2**32),
]
# Boundary values that are fine.
GOOD_VALUES = [
  ('model.halo_size', 0),
  ('label_smoothing', 0.0),
  ('ema_decay', 0.0),
  ('input.crop_fraction', 1.0),
  ('input.randaugment_magnitude', 30),
  ('seed', 2**32 - 1),
  ('optimizer.warmup_epochs', 0.0),
  ('variant', 'my_halonet'),
  ('input.pixel_mean', (0.0, 1.0, 0.5)),
  ('input.pixel_std', (1e-3, 1.0, 2.0)),
  ('profile_steps', (1, 1)),
  ('input.crop_area_range', (0.5, 0.5)),
  ('model.halo_sizes', (0, 0, 0, 0)),
  ('variant', 'h7'),
]


def _with(field, value):
  config = tiny.get_config()
  config.update_from_flattened_dict({field: value})
  return config


def test_every_ranged_field_has_a_bad_value_here():
  assert set(config_checks.RANGES) <= {field for field, _ in BAD_VALUES}


@pytest.mark.parametrize('field, value', BAD_VALUES)
def test_bad_value_fails_in_one_line_naming_it(field, value):
  with pytest.raises(ValueError) as error:
    config_checks.validate_config(_with(field, value), num_devices=1, process_count=1)
  message = str(error.value)
  assert f'{field}={value}' in message and '\n' not in message, message


@pytest.mark.parametrize(
  'field, value, named',
  [
    ('model.widths', (8, 0, 16, 32), 'model.widths=(8, 0, 16, 32)'),
    ('model.stage_depths', (1, 1, 0, 1), 'model.stage_depths=(1, 1, 0, 1)'),
    ('model.block_sizes', (4, 4, 0, 4), 'model.block_sizes=(4, 4, 0, 4)'),
    ('input.crop_area_range', (0.0, 1.0), 'crop_area_range=(0.0, 1.0)'),
    ('input.crop_area_range', (0.5, 1.5), 'crop_area_range=(0.5, 1.5)'),
    ('model.halo_sizes', (1, 1, -1, 1), 'model.halo_sizes=(1, 1, -1, 1)'),
    ('fewshot_shots', (1, 0), 'fewshot_shots=(1, 0)'),
    ('fewshot_shots', (1, 2.5), 'fewshot_shots=(1, 2.5)'),
    ('model.num_heads', (2, 2, 2, True), 'model.num_heads=(2, 2, 2, True)'),
    ('evals', ('imagenet_a', 'cifar10@0'), "evals entry 'cifar10@0'"),
    ('model.activation', 'gelu', "activation='gelu'"),
    ('input.pixel_mean', (0.5, 0.5), 'pixel_mean=(0.5, 0.5)'),
    ('input.pixel_mean', (0.5, 1.5, 0.5), 'pixel_mean=(0.5, 1.5, 0.5)'),
    ('input.pixel_mean', (0.5, 0.5, -0.1), 'pixel_mean=(0.5, 0.5, -0.1)'),
    ('input.pixel_std', (0.5, 0.0, 0.5), 'pixel_std=(0.5, 0.0, 0.5)'),
    ('input.pixel_std', (0.5, float('nan'), 0.5), 'pixel_std=(0.5, nan, 0.5)'),
    ('variant', 'h8', "variant='h8'"),
    ('optimizer.name', 'lamb', "'lamb'"),
    ('profile_steps', (3, 2), 'profile_steps=(3, 2)'),
    ('profile_steps', (0, 2), 'profile_steps=(0, 2)'),
    ('profile_steps', (1, 2, 3), 'profile_steps=(1, 2, 3)'),
    ('trainable', 'backbone', "trainable='backbone'"),
  ],
)
def test_bad_sequence_or_name_fails_in_one_line_naming_it(field, value, named):
  with pytest.raises(ValueError) as error:
    config_checks.validate_config(_with(field, value), num_devices=1, process_count=1)
  assert named in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('field, value', GOOD_VALUES)
def test_boundary_values_are_accepted(field, value):
  config_checks.validate_config(_with(field, value), num_devices=1, process_count=1)


@pytest.mark.parametrize(
  'steps, epochs, ok', [(0, 0.0, False), (-1, 0.0, False), (1, 0.0, True), (0, 1.0, True)]
)
def test_a_run_needs_a_positive_step_count_or_epoch_count(steps, epochs, ok):
  config = _with('num_train_steps', steps)
  config.num_epochs = epochs
  if ok:
    config_checks.validate_config(config, num_devices=1, process_count=1)
  else:
    with pytest.raises(ValueError, match=f'num_epochs={epochs} must be > 0'):
      config_checks.validate_config(config, num_devices=1, process_count=1)


@pytest.mark.parametrize(
  'overrides, devices, processes, named',
  [
    ({'batch_size': 0}, 1, 1, 'batch_size=0 is not a positive multiple of the 1 devices'),
    ({'batch_size': 6}, 4, 1, 'batch_size=6 is not a positive multiple of the 4 devices'),
    ({'eval_batch_size': 6}, 4, 1, 'eval_batch_size=6 is not a positive multiple of the 4'),
    ({'batch_size': 4, 'eval_batch_size': 4}, 1, 3, 'batch_size=4 is not divisible by the 3'),
    ({'batch_size': 6, 'eval_batch_size': 4}, 2, 3, 'eval_batch_size=4 is not divisible by the 3'),
    ({'mesh_shape': (1, 3)}, 3, 1, 'image_size=32 does not split into 3 equal bands'),
  ],
)
def test_batches_and_rows_must_split_over_the_given_devices(overrides, devices, processes, named):
  """Against the device and process counts passed in (this process has 8 fake devices)."""
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=named):
    config_checks.validate_config(config, num_devices=devices, process_count=processes)


@pytest.mark.parametrize(
  'overrides, devices, processes',
  [
    ({'batch_size': 1, 'eval_batch_size': 1}, 1, 1),
    ({'batch_size': 3, 'eval_batch_size': 3}, 3, 3),
    ({'mesh_shape': (2, 2), 'batch_size': 2, 'eval_batch_size': 2}, 4, 2),
  ],
)
def test_batches_that_split_over_the_given_devices_are_accepted(overrides, devices, processes):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  config_checks.validate_config(config, num_devices=devices, process_count=processes)
