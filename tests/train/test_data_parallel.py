"""The train step is data-parallel on 8 (fake CPU) devices, and lowers loop-free for TPU and GPU.

Checked on the compiled HLO, not by timing: the collectives XLA inserts, the trip counts of its
loops, and its per-device FLOPs and buffer plan against a 1-device step on the per-device batch.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import pytest

from configs import h1
from configs import halonet as named_configs
from configs import tiny
from halonet import sharding
from halonet.models import networks
from halonet.tools import convert
from halonet.train import step as train_step_lib
from tests import compile_flags
from tests import hlo

GLOBAL_BATCH = 64
DEVICES = 8
# configs/tiny.py with every mixer, channel attention, BAM and the SASA stem, over two models.
MODULE_MODELS = {
  'tiny_modules_a': {
    'model.mixers': ('sasa', 'sk', 'split', 'global'),
    'model.channel_attention': ('cbam', 'ge', 'ge_plus', 'eca'),
    'model.stage_attention': 'bam',
    'model.stem': 'sasa',
  },
  'tiny_modules_b': {
    'model.mixers': ('condconv', 'dynamic', 'halo', 'conv'),
    'model.channel_attention': ('se', 'ge_minus', '', 'se'),
    'model.stem': 'deep',
    'model.shortcut': 'avg_down',
  },
}


def accelerator_config(model: str):
  """A MODULE_MODELS config with 'auto' dtype (bfloat16 on TPU and GPU)."""
  config = model_config(model)
  config.variant, config.model.dtype = model, 'auto'
  return config


def model_config(model: str):
  """configs/tiny.py, one of MODULE_MODELS, or a timm network's converted config."""
  if model == 'tiny' or model in MODULE_MODELS:
    config = tiny.get_config()
    config.update_from_flattened_dict(MODULE_MODELS.get(model, {}))
    return config
  return convert.model_config(model)


@functools.cache
def compiled_train_step(
  impl: str, batch: int, devices: int, model: str = 'tiny', fusion_emitters: bool = False
):
  """The real train step of configs/tiny.py (or of timm's `model`, converted ones' config),
  compiled, as `impl` 'name@backend' builds it; with XLA:CPU's fusion emitters for tests that
  read its loops (compile_flags.py)."""
  config = model_config(model)
  config.batch_size = batch
  impl, backend = impl.split('@')  # e.g. 'auto@tpu': attention_impl 'auto' as it resolves on TPU.
  config.model.attention_impl = impl
  mesh = sharding.create_mesh((-1, 1), jax.devices()[:devices])
  lowered, model = train_step_lib.lower_train_step(config, mesh, backend=backend)
  num_params = networks.count_params(config)
  options = compile_flags.FUSION_EMITTERS if fusion_emitters else None
  return lowered.compile(options), num_params, model


# 'auto@tpu' and 'auto@gpu' resolve to the same implementation; one is enough to compile.
@pytest.mark.parametrize(
  'impl, model',
  # haloregnetz_b: timm's RegNetZ blocks and average-pooled strided halo, at 2 images a device.
  [
    ('auto@tpu', 'tiny'),
    ('rows@cpu', 'tiny'),
    ('auto@tpu', 'haloregnetz_b'),
    *[('auto@tpu', name) for name in MODULE_MODELS],
  ],
)
def test_train_step_only_all_reduces_parameter_sized_tensors(impl, model):
  """Data parallelism: gradients and BN statistics are all-reduced, nothing is gathered."""
  batch = GLOBAL_BATCH if model == 'tiny' else 2 * DEVICES
  compiled, num_params, _ = compiled_train_step(impl, batch, DEVICES, model)
  collectives = hlo.hlo_ops(compiled.as_text(), hlo.COLLECTIVES)
  assert {op for op, _ in collectives} == {'all-reduce'}, collectives
  reduced = [dims for _, shape in collectives for dims in hlo.array_dims(shape)]
  # No NHWC activation led by a batch (the only 4-d parameter is the stem's [7, 7, 3, 64]).
  assert not any(len(dims) == 4 and dims[0] in (batch, batch // DEVICES) for dims in reduced), (
    reduced
  )
  total = sum(math.prod(dims) for dims in reduced)
  assert total < 1.5 * num_params, (total, num_params)  # Gradients, BN statistics, metrics.


def test_accelerator_train_step_has_no_loop():
  compiled, _, model = compiled_train_step('auto@tpu', GLOBAL_BATCH, DEVICES, fusion_emitters=True)
  assert model.attention.default == 'plain'
  assert hlo.trip_counts(compiled.as_text()) == []
  assert not hlo.hlo_ops(compiled.as_text(), ('while',))


def test_cpu_row_loop_runs_over_this_devices_images_only():
  """The CPU path loops over (image, block row) pairs: 8 devices run the trip counts of one
  device on the per-device batch, not of the global batch."""

  def trip_counts(batch, devices):
    compiled = compiled_train_step('rows@cpu', batch, devices, fusion_emitters=True)[0]
    return hlo.trip_counts(compiled.as_text())

  sharded, single = trip_counts(GLOBAL_BATCH, DEVICES), trip_counts(GLOBAL_BATCH // DEVICES, 1)
  assert sharded and sharded == single
  # configs/tiny.py: b = 4 on 8x8 and 4x4 maps: 2 and 1 rows of blocks per image.
  assert set(sharded) == {2 * GLOBAL_BATCH // DEVICES, GLOBAL_BATCH // DEVICES}


@pytest.mark.parametrize('impl', ['auto@tpu', 'rows@cpu'])
def test_per_device_cost_is_that_of_the_per_device_batch(impl):
  """XLA costs a loop body once: a loop over the global batch is the trip-count test's to catch."""
  sharded = compiled_train_step(impl, GLOBAL_BATCH, DEVICES)[0]
  single = compiled_train_step(impl, GLOBAL_BATCH // DEVICES, 1)[0]
  flops = sharded.cost_analysis()['flops'], single.cost_analysis()['flops']
  temp = (sharded.memory_analysis().temp_size_in_bytes, single.memory_analysis().temp_size_in_bytes)
  assert abs(flops[0] / flops[1] - 1) < 0.25, flops
  assert abs(temp[0] / temp[1] - 1) < 0.25, temp


@pytest.mark.parametrize(
  'config',
  # And two of timm's, which between them hold every layer kind the converted models add.
  [
    h1.get_config(),
    convert.model_config('haloregnetz_b'),
    convert.model_config('lamhalobotnet50ts_256'),
    # SASA's ResNet and every mixer, gate and stem, in bfloat16 as a TPU or GPU runs them.
    named_configs.get_config('sasa_resnet26'),
    *[accelerator_config(name) for name in MODULE_MODELS],
  ],
  ids=lambda config: config.variant,
)
def test_forward_backward_lowers_for_tpu_and_gpu_without_a_loop(config):
  """Cross-platform lowering needs no accelerator: the StableHLO a TPU or GPU would compile."""
  model = networks.create_model(config, backend='tpu')
  assert (model.attention.default, model.dtype) == ('plain', 'bfloat16')
  size = config.image_size
  variables = networks.abstract_variables(config)

  def loss(params, batch_stats, images):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    return logits.sum()

  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=('tpu', 'cuda'))(
    variables['params'], variables['batch_stats'], images
  )
  text = exported.mlir_module()
  assert exported.platforms == ('tpu', 'cuda')
  assert 'stablehlo.while' not in text
  assert re.search(r'stablehlo.dot_general.*tensor<[0-9x]+xbf16>', text)  # bfloat16 products.
