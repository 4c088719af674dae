"""A trained run put to use: its variables, predictions, and its backbone's multi-scale features.

    config, variables, step = trained.load('/runs/h1')      # latest step, raw weights
    maps = trained.features(config, variables, images)    # {'stage1': [B, H/4, W/4, C], ...}

`features` is a pure function of (variables, images), so it runs under `jax.jit` and `jax.grad`:
a detection or segmentation head can fine-tune the backbone through it. Halo attention has no
parameter that depends on the map size, so any input size works (sizes b does not divide are
padded and masked inside each layer).
"""

from collections.abc import Sequence
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from halonet import errors
from halonet import paths
from halonet import sharding
from halonet.data import preprocessing
from halonet.data.tensorflow_import import tf
from halonet.models import halonet as model_lib
from halonet.models import networks
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib

WEIGHTS = ('raw', 'ema')
PREDICT_BATCH = 32


def load(
  workdir: str,
  step: int | None = None,
  weights: str = 'raw',
  config: ml_collections.ConfigDict | None = None,
) -> tuple[ml_collections.ConfigDict, dict[str, Any], int]:
  """(config, {'params', 'batch_stats'}, step) of a run's checkpoint, read-only, on this
  process's devices. `config` defaults to the run's own (workdir/config.json)."""
  if weights not in WEIGHTS:
    raise errors.ConfigError(f'weights={weights!r} is not one of {WEIGHTS}')
  config = config or workdir_lib.load_config(workdir)
  mesh = sharding.create_mesh((-1, 1), jax.local_devices())
  state, _, _ = train_step_lib.restore_run(config, workdir, mesh, step)
  if weights == 'ema' and state.ema_params is None:
    raise errors.ConfigError(
      f'{workdir} was trained without an EMA (config.ema_decay=0): use weights=raw'
    )
  params = state.ema_params if weights == 'ema' else state.params
  return config, {'params': params, 'batch_stats': state.batch_stats}, int(state.step)


def features(
  config: ml_collections.ConfigDict, variables: dict[str, Any], images: jax.Array
) -> dict[str, jax.Array]:
  """Each stage's output for images [B, H, W, 3] of pixel values 0-255 (uint8 or float),
  normalised as in training: 'stage1'..'stage4' at strides 4, 8, 16 and 32 (ceil(H / stride)
  rows), BatchNorm with its running statistics."""
  model = networks.create_model(config)
  x = preprocessing.normalize_images(jnp.asarray(images), config.input, jnp.dtype(model.dtype))
  _, sown = model.apply(variables, x, train=False, mutable=[model_lib.FEATURES])
  return {name: values[0] for name, values in sown[model_lib.FEATURES].items()}


def read_images(
  image_paths: Sequence[str], config: ml_collections.ConfigDict
) -> tuple[list[str], np.ndarray, dict[str, str]]:
  """(files, uint8 [N, s, s, 3], {file: why it was left out}) for files and folders (every file
  under them, sorted), converted as evaluation converts: any size, mode and image format.
  Local files and URLs alike are read through halonet/paths.py."""
  files, problems = paths.expand_files(image_paths)
  images, good = [], []
  for path in files:
    try:
      data = tf.constant(paths.path(path).read_bytes())
      images.append(preprocessing.eval_image(data, config.image_size, config.input.crop_fraction))
      good.append(path)
    except tf.errors.OpError as e:  # TF's message, without its op and device prefix.
      reason = re.sub(r'^\{\{.*?\}\}\s*|\s*\[Op:.*$', '', e.message.splitlines()[0])
      problems[path] = f'not a decodable image ({reason})'
  size = config.image_size
  stacked = (
    np.stack([i.numpy() for i in images]) if images else np.zeros((0, size, size, 3), np.uint8)
  )
  return good, stacked, problems


def predict(
  config: ml_collections.ConfigDict,
  variables: dict[str, Any],
  images: np.ndarray,
  batch_size: int = PREDICT_BATCH,
) -> np.ndarray:
  """Class probabilities [N, num_classes] of uint8 images [N, s, s, 3], in fixed-size batches
  (the last one padded) so that one compilation serves any N."""
  model = networks.create_model(config)

  @jax.jit
  def probabilities(batch):
    x = preprocessing.normalize_images(batch, config.input, jnp.dtype(model.dtype))
    return jax.nn.softmax(model.apply(variables, x, train=False).astype(jnp.float32))

  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start : start + batch_size]
    padded = np.concatenate(
      [batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)]
    )
    out.append(np.asarray(probabilities(padded))[: len(batch)])
  return np.concatenate(out) if out else np.zeros((0, config.num_classes), np.float32)
