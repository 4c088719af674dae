"""Spatial partitioning on 8 (fake CPU) devices, mesh (4 data, 2 spatial): image rows split over
the 'spatial' axis give the unsharded results, move only halo rows, and cost 1/8 per device."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import tiny
from halonet import attention
from halonet import sharding
from halonet.attention import AttentionPlan
from halonet.attention import spatial as attention_spatial
from halonet.train import step as train_step_lib
from tests import forms
from tests import hlo

MESH = (4, 2)


@pytest.mark.parametrize('rows, band', [(1, 4), (3, 4), (4, 4), (6, 4), (9, 4)])
def test_each_device_receives_the_rows_next_to_its_band(rows, band):
  """Against numpy slicing of the whole map: rows above and below each band, zeros past the
  image, several hops when the halo is wider than a band."""
  devices = 4
  mesh = jax.make_mesh(
    (devices,), ('spatial',), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices]
  )
  image = np.arange(devices * band * 3, dtype=np.float32).reshape(1, devices * band, 3) + 1
  padded = np.pad(image, ((0, 0), (rows, rows), (0, 0)))

  def per_device(x):
    return (
      attention_spatial.receive_rows(x, rows, True, 'spatial'),
      attention_spatial.receive_rows(x, rows, False, 'spatial'),
    )

  above, below = jax.jit(
    jax.shard_map(per_device, mesh=mesh, in_specs=P(None, 'spatial'), out_specs=P(None, 'spatial'))
  )(image)
  for i in range(devices):
    start = i * band + rows  # The band's first row in `padded`.
    np.testing.assert_array_equal(
      above[:, i * rows : (i + 1) * rows], padded[:, start - rows : start]
    )
    np.testing.assert_array_equal(
      below[:, i * rows : (i + 1) * rows], padded[:, start + band : start + band + rows]
    )


@pytest.mark.parametrize(
  'impl, height, block, halo, stride, mask_window',
  [
    ('plain', 16, 4, 1, 1, 0),  # Whole block rows per device: only the halo moves.
    ('rows', 16, 4, 2, 2, 3),  # Strided, masked, the CPU row loop per device.
    ('plain', 15, 4, 2, 2, 0),  # 4 block rows of a map b does not divide.
    ('rows', 10, 2, 3, 1, 0),  # 5 block rows padded to 6; h = 3 reaches two devices away.
    ('pallas', 10, 2, 3, 2, 3),  # The kernels per device band: strided, masked, h = 3.
    ('pallas_gpu', 10, 2, 3, 1, 3),  # The GPU kernels per band: h > b, masked.
  ],
)
def test_attention_layer_and_gradients_equal_the_unsharded_layer(
  impl, height, block, halo, stride, mask_window
):
  layer = attention.HaloAttention(
    qk_width=8,
    value_width=8,
    num_heads=2,
    block_size=block,
    halo_size=halo,
    stride=stride,
    mask_window=mask_window,
    attention=AttentionPlan(impl),
  )
  x = jax.random.normal(jax.random.key(0), (8, height, height + 3, 6))
  variables = layer.init(jax.random.key(1), x)

  def loss(variables, x):
    y = layer.apply(variables, x)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))

  value_and_grads = jax.value_and_grad(loss, argnums=(0, 1))
  want = forms.jit(value_and_grads, impl)(variables, x)
  mesh = sharding.create_mesh(MESH)
  rows = P('data', 'spatial') if height % MESH[1] == 0 else P('data')
  got = forms.jit(sharding.traced_within(mesh, value_and_grads), impl)(
    variables, jax.device_put(x, NamedSharding(mesh, rows))
  )
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


def test_attention_weights_are_refused_on_partitioned_images():
  layer = attention.HaloAttention(qk_width=8, value_width=8, num_heads=2, block_size=4, halo_size=1)
  x = jnp.zeros((8, 16, 16, 6))
  variables = layer.init(jax.random.key(0), x)
  record = lambda v, x: layer.apply(v, x, mutable=[attention.ATTENTION_WEIGHTS])
  mesh = sharding.create_mesh(MESH)
  with pytest.raises(ValueError, match='attention weights are recorded on unpartitioned images'):
    jax.jit(sharding.traced_within(mesh, record))(variables, x)


def _spatial_config(attention_impl: str, batch: int):
  """configs/tiny.py at 128 px with b = 2: every stage's map splits into whole block rows on 2
  spatial devices (32, 16, 8 and 4 rows; 16, 8, 4 and 2 blocks)."""
  config = tiny.get_config()
  config.image_size, config.batch_size = 128, batch
  config.model.block_size = 2
  config.model.attention_impl = attention_impl
  return config


@functools.cache
def _compiled(impl: str, mesh_shape: tuple[int, int]):
  config = _spatial_config(impl.split('@')[0], batch=8)
  devices = math.prod(mesh_shape)
  mesh = sharding.create_mesh(mesh_shape, jax.devices()[:devices])
  lowered, _ = train_step_lib.lower_train_step(config, mesh, backend=impl.split('@')[1])
  return lowered.compile()


# The accelerator form; the CPU row loop runs inside the same shard_map (numerics: above).
@pytest.mark.parametrize('impl', ['auto@tpu'])
def test_train_step_exchanges_only_border_rows(impl):
  """No all-gather: besides all-reduces of parameter-sized tensors, devices swap at most 3 rows
  (the 7x7 stride-2 stem's border; attention's h = 1; the max-pool's 1)."""
  collectives = hlo.hlo_ops(_compiled(impl, MESH).as_text(), hlo.COLLECTIVES)
  assert {op for op, _ in collectives} == {'all-reduce', 'collective-permute'}, collectives
  permuted = [
    dims
    for op, shape in collectives
    if op == 'collective-permute'
    for dims in hlo.array_dims(shape)
  ]
  assert permuted and all(len(d) >= 4 and d[0] == 8 // MESH[0] and d[1] <= 3 for d in permuted)
  reduced = [
    dims for op, shape in collectives if op == 'all-reduce' for dims in hlo.array_dims(shape)
  ]
  assert not any(len(dims) == 4 and dims[0] == 8 // MESH[0] for dims in reduced), reduced


@pytest.mark.parametrize('impl', ['auto@tpu'])
def test_per_device_cost_is_an_eighth_of_one_device(impl):
  sharded, single = _compiled(impl, MESH), _compiled(impl, (1, 1))
  flops = sharded.cost_analysis()['flops'] / single.cost_analysis()['flops']
  temp = sharded.memory_analysis().temp_size_in_bytes / single.memory_analysis().temp_size_in_bytes
  assert abs(flops * 8 - 1) < 0.25 and abs(temp * 8 - 1) < 0.25, (flops, temp)
