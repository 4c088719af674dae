"""Offline quick-start: a small all-attention HaloNet on scikit-learn's digits, 2 CPU cores."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.variant = 'quickstart'
  config.image_size = 32
  config.num_classes = 10
  m = config.model
  m.block_size, m.halo_size = 4, 2
  m.widths = (32, 64, 96, 128)
  m.stage_depths = (1, 1, 1, 1)
  m.num_heads = (4, 4, 4, 4)
  config.dataset = 'digits'
  config.eval_splits = ('test',)
  config.randaugment_layers = 0
  config.randaugment_magnitude = 0
  config.batch_size = 64
  config.eval_batch_size = 200
  config.num_epochs = 30.0
  config.shuffle_buffer = 2048
  config.label_smoothing = 0.0
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.05
  config.optimizer.warmup_epochs = 1.0
  config.log_every_steps = 20
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
