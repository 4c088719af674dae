"""A fresh train state and the jitted step, built without reading data, and random uint8 batches:
what the tests of the train step and of the attention's fused forms start from."""

from typing import Any

import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

from halonet.models import networks
from halonet.train import optim
from halonet.train import step as train_step_lib


def fresh_state_and_step(
  config: ml_collections.ConfigDict, mesh: Mesh, total_steps: int | None = None
) -> tuple[train_step_lib.TrainState, Any]:
  """The state initialised from config.seed and the jitted train step, with a schedule of 10
  steps per epoch over `total_steps` (default: config.num_train_steps)."""
  model = networks.create_model(config)
  total = config.num_train_steps if total_steps is None else total_steps
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=total)
  tx = optim.create_optimizer(config, schedule)
  init, abstract = train_step_lib.abstract_train_state(config, model, tx, mesh)
  shardings = train_step_lib.shardings_of(abstract)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
  step = train_step_lib.make_train_step(config, model, tx, schedule, mesh, shardings)
  return state, step


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """config.batch_size random images and labels, as the input pipeline yields them."""
  rng = np.random.default_rng(seed)
  s = config.image_size
  return {
    'image': rng.integers(0, 256, (config.batch_size, s, s, 3), dtype=np.uint8),
    'label': rng.integers(0, config.num_classes, config.batch_size, dtype=np.int32),
  }
