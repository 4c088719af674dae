"""The mesh and data placement (halonet/sharding.py), against hand-written expectations: mesh
shapes, where each example and image row lands, per-device computation under the data axis and
its gradients, and prefetch order. The 8 devices are conftest.py's fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halonet import sharding


@pytest.mark.parametrize(
  'shape, devices, want',
  [((-1, 1), 8, (8, 1)), ((2, -1), 8, (2, 4)), ((4, 2), 8, (4, 2)), ((1, 1), 1, (1, 1))],
)
def test_mesh_shape_fills_its_one_free_axis(shape, devices, want):
  got = sharding.resolve_mesh_shape(shape, devices)
  assert got == want and all(type(n) is int for n in got)


@pytest.mark.parametrize(
  'shape, devices, named',
  [
    ((-1, -1), 8, 'at most one -1'),
    ((8,), 8, 'must be (data, spatial)'),
    ((8, 1, 1), 8, 'must be (data, spatial)'),
    ((0, 8), 8, 'positive sizes'),
    ((8, -2), 8, 'positive sizes'),
    ((3, -1), 8, 'does not divide the 8 devices'),
    ((4, 1), 8, 'needs 4 devices but there are 8'),
    ((4, 4), 8, 'needs 16 devices but there are 8'),
  ],
)
def test_bad_mesh_shape_fails_in_one_line_naming_it(shape, devices, named):
  with pytest.raises(ValueError, match=named.replace('(', r'\(').replace(')', r'\)')) as error:
    sharding.resolve_mesh_shape(shape, devices)
  assert f'mesh_shape={tuple(shape)}' in str(error.value) or 'needs' in str(error.value)


def test_mesh_has_the_named_axes_and_spatial_size():
  mesh = sharding.create_mesh((2, 4))
  assert dict(mesh.shape) == {'data': 2, 'spatial': 4}
  assert sharding.spatial_size(mesh) == 4
  assert sharding.spatial_size(sharding.create_mesh((8, 1))) == 1
  assert sharding.spatial_size(jax.sharding.get_abstract_mesh()) == 1  # No mesh set.
  assert sharding.spatial_size(jax.make_mesh((8,), ('data',))) == 1


def test_mesh_takes_the_devices_it_is_given():
  devices = jax.devices()[6:8]
  mesh = sharding.create_mesh((-1, 1), devices)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in devices]


def _placed(mesh, x):
  """x split over 'data' where it splits (replicated otherwise), and w = 3 replicated."""
  splits = x.shape[0] % mesh.shape['data'] == 0
  spec = jax.sharding.PartitionSpec('data' if splits else None)
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  return x, jax.device_put(jnp.float32(3.0), sharding.replicated(mesh))


def _per_device(mesh, batch, fn):
  """fn run through per_device_images under `mesh`, on a batch of `batch` examples."""
  x, w = _placed(mesh, jnp.arange(batch * 2, dtype=jnp.float32).reshape(batch, 2))
  run = sharding.traced_within(mesh, sharding.per_device_images(fn, batched=1))
  return jax.jit(run)(x, w), x, w


@pytest.mark.parametrize(
  'mesh_shape, batch, per_device', [((4, 2), 8, 2), ((4, 2), 6, 6), ((2, 4), 8, 4)]
)
def test_each_device_computes_its_own_images_when_the_batch_splits(mesh_shape, batch, per_device):
  """4 data devices: 8 images give 2 each; 6 do not split, so fn sees all of them."""
  mesh = sharding.create_mesh(mesh_shape)
  out, x, w = _per_device(mesh, batch, lambda x, w: x * w + x.shape[0])
  np.testing.assert_allclose(out, x * 3 + per_device)


@pytest.mark.parametrize('mesh', [(1, 8), 'spatial only'])
def test_without_a_data_axis_fn_runs_as_is(mesh):
  if mesh == 'spatial only':
    mesh = jax.make_mesh((8,), ('spatial',), axis_types=(jax.sharding.AxisType.Auto,))
  else:
    mesh = sharding.create_mesh(mesh)
  x = jnp.arange(16, dtype=jnp.float32).reshape(8, 2)
  fn = sharding.per_device_images(lambda x, w: x * w + x.shape[0], batched=1)
  out = jax.jit(sharding.traced_within(mesh, fn))(x, jnp.float32(3.0))
  np.testing.assert_allclose(out, x * 3 + 8)


def test_without_a_mesh_fn_runs_as_is():
  x = jnp.arange(16, dtype=jnp.float32).reshape(8, 2)
  fn = sharding.per_device_images(lambda x, w: x * w + x.shape[0], batched=1)
  np.testing.assert_allclose(jax.jit(fn)(x, jnp.float32(3.0)), x * 3 + 8)


def test_three_leading_inputs_are_split_by_default_and_nesting_runs_inside():
  """q, k, v split and w shared by default; called again inside, fn runs on its own share."""
  mesh = sharding.create_mesh((4, 2))
  x, w = _placed(mesh, jnp.arange(16, dtype=jnp.float32).reshape(8, 2))
  inner = sharding.per_device_images(lambda a, b, c, w: a + b * c * w + a.shape[0])
  outer = sharding.per_device_images(lambda a, b, c, w: inner(a, b, c, w) + a.shape[0])
  out = jax.jit(sharding.traced_within(mesh, outer))(x, x, x, w)
  np.testing.assert_allclose(out, x + 3 * x * x + 2 + 2)


@pytest.mark.parametrize('mesh_shape', [(8, 1), (4, 2)])
def test_shared_inputs_gradient_is_summed_over_the_devices(mesh_shape):
  """d/dw sum(x * w) = sum(x) over the whole batch: not one device's share of it, and not
  counted again on each spatial device."""
  mesh = sharding.create_mesh(mesh_shape)
  x, w = _placed(mesh, jnp.arange(16, dtype=jnp.float32).reshape(8, 2))
  fn = sharding.per_device_images(lambda x, w: x * w, batched=1)
  loss = sharding.traced_within(mesh, lambda x, w: fn(x, w).sum())
  grad_x, grad_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(grad_w, x.sum())
  np.testing.assert_allclose(grad_x, np.full((8, 2), 3.0))


def test_batch_entries_split_examples_and_only_images_split_rows():
  shardings = sharding.batch_shardings(sharding.create_mesh((4, 2)), ['image', 'label'])
  assert shardings['image'].spec == jax.sharding.PartitionSpec('data', 'spatial')
  assert shardings['label'].spec == jax.sharding.PartitionSpec('data')
  assert sharding.replicated(sharding.create_mesh((4, 2))).spec == jax.sharding.PartitionSpec()


def test_batches_split_examples_over_data_and_image_rows_over_spatial():
  mesh = sharding.create_mesh((4, 2))
  batch = {
    'image': np.arange(16 * 6 * 5 * 3, dtype=np.float32).reshape(16, 6, 5, 3),
    'label': np.arange(16, dtype=np.int32),
  }
  placed = sharding.shard_batch(batch, mesh)
  for key, x in placed.items():
    assert len(x.addressable_shards) == 8
    for shard in x.addressable_shards:
      data_index, spatial_index = np.argwhere(mesh.device_ids == shard.device.id)[0]
      want = batch[key][4 * data_index : 4 * data_index + 4]
      if key == 'image':  # Rows 0-2 on the first spatial device, 3-5 on the second.
        want = want[:, 3 * spatial_index : 3 * spatial_index + 3]
      np.testing.assert_array_equal(shard.data, want)


def test_prefetch_to_device_keeps_order_and_reads_only_two_ahead():
  mesh = sharding.create_mesh((4, 2))
  read = []

  def host_batches():
    for i in range(5):
      read.append(i)
      yield {'image': np.full((8, 2), i, np.float32)}

  batches = sharding.prefetch_to_device(host_batches(), mesh, size=2)
  first = next(batches)
  assert read == [0, 1, 2]  # The batch handed out plus two in flight.
  assert first['image'].sharding == sharding.batch_shardings(mesh, ['image'])['image']
  rest = [int(b['image'][0, 0]) for b in batches]
  assert [int(first['image'][0, 0])] + rest == [0, 1, 2, 3, 4]
