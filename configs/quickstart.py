"""Offline quick-start: a small all-attention HaloNet on scikit-learn's digits, 2 CPU cores."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.digits_config()
  config.variant = 'quickstart'
  m = config.model
  m.block_size, m.halo_size = 4, 2
  m.widths = (32, 64, 96, 128)
  m.num_heads = (4, 4, 4, 4)
  config.batch_size = 64
  config.eval_batch_size = 200
  config.num_epochs = 60.0
  config.shuffle_buffer = 2048
  config.label_smoothing = 0.0
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 4e-3  # Per 256 images: 1e-3 at batch 64.
  config.optimizer.weight_decay = 0.05
  config.optimizer.warmup_epochs = 1.0
  config.log_every_steps = 20
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
