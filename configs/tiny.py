"""A few-thousand-parameter HaloNet for unit tests on CPU (32 px digits)."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.digits_config()
  config.variant = 'tiny'
  m = config.model
  m.block_size, m.halo_size = 4, 1
  m.widths = (8, 16, 16, 32)
  m.num_heads = (2, 2, 2, 2)
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 4
  config.shuffle_buffer = 256
  config.optimizer.warmup_epochs = 0.0
  config.log_every_steps = 1
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  return config
