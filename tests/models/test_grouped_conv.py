"""The grouped convolution of timm's models (halonet/models/grouped_conv.py) against one dense
convolution per group: values and both gradients, on the CPU form; TPU and GPU lower XLA's own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halonet.models import conv_norm
from halonet.models import grouped_conv

LAYOUT = ('NHWC', 'HWIO', 'NHWC')


def per_group_reference(x, kernel, stride, groups):
  """Each group's channels through its own dense convolution, concatenated."""
  per_group = kernel.shape[2]
  outs = jnp.split(kernel, groups, axis=3)
  return jnp.concatenate(
    [
      jax.lax.conv_general_dilated(
        x[..., g * per_group : (g + 1) * per_group],
        outs[g],
        (stride, stride),
        ((1, 1), (1, 1)),
        dimension_numbers=LAYOUT,
      )
      for g in range(groups)
    ],
    axis=-1,
  )


@pytest.mark.parametrize(
  'stride, groups, dtype', [(1, 3, 'float32'), (2, 4, 'float32'), (2, 2, 'bfloat16')]
)
def test_values_and_gradients_equal_one_dense_conv_per_group(stride, groups, dtype):
  channels = 4 * groups
  x = jax.random.normal(jax.random.key(0), (2, 9, 10, channels), dtype)
  conv = nn.Conv(
    channels,
    (3, 3),
    strides=stride,
    padding=((1, 1), (1, 1)),
    feature_group_count=groups,
    use_bias=False,
    dtype=dtype,
    conv_general_dilated=grouped_conv.grouped_conv,
  )
  params = conv.init(jax.random.key(1), x)
  kernel = params['params']['kernel']
  weights = jax.random.normal(jax.random.key(2), (2, -(-9 // stride), -(-10 // stride), channels))
  loss = lambda y: (y.astype(jnp.float32) * weights).sum()
  got, got_grads = jax.value_and_grad(lambda x, p: loss(conv.apply(p, x)), argnums=(0, 1))(
    x, params
  )
  want, want_grads = jax.value_and_grad(
    lambda x, k: loss(per_group_reference(x, k.astype(dtype), stride, groups)), argnums=(0, 1)
  )(x, kernel)
  tolerance = 1e-5 if dtype == 'float32' else 2e-2
  scale = lambda a: float(jnp.abs(a.astype(jnp.float32)).max())
  assert abs(float(got) - float(want)) <= tolerance * abs(float(want)) + tolerance
  for a, b in ((got_grads[0], want_grads[0]), (got_grads[1]['params']['kernel'], want_grads[1])):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tolerance * scale(b)
    )


def test_tpu_and_gpu_lower_xlas_grouped_convolution_and_cpu_the_shifted_views():
  x = jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)
  grad = jax.jit(
    jax.grad(
      lambda x, k: grouped_conv.grouped_conv(
        x, k, (1, 1), ((1, 1), (1, 1)), feature_group_count=2
      ).sum(),
      argnums=1,
    )
  )
  accelerators = jax.export.export(grad, platforms=('tpu', 'cuda'))(x, kernel).mlir_module()
  cpu = jax.export.export(grad, platforms=('cpu',))(x, kernel).mlir_module()
  # XLA's kernel gradient of a grouped convolution is a convolution with batch groups.
  assert 'batch_group_count = 2' in accelerators
  assert 'batch_group_count' not in cpu and 'stablehlo.dot_general' in cpu


def test_a_dilated_convolution_is_refused():
  x, kernel = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 2, 4))
  with pytest.raises(ValueError, match='no dilation'):
    grouped_conv.grouped_conv(
      x, kernel, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2), feature_group_count=2
    )


@pytest.mark.parametrize('groups', [2, 4])
def test_grouped_conv_norm_act_takes_the_shifted_views_on_cpu(groups):
  """timm's grouped ConvNormAct (groups > 1) convolves through grouped_conv, so its CPU kernel
  gradient is a contraction, not XLA's batch-grouped convolution."""
  layer = conv_norm.ConvNormAct(
    8, 3, conv_norm.batch_norm(train=False, dtype=jnp.float32), groups=groups
  )
  x = jnp.zeros((2, 8, 8, 8))
  variables = layer.init(jax.random.key(0), x)
  loss = lambda params: layer.apply({**variables, 'params': params}, x).sum()
  cpu = jax.export.export(jax.jit(jax.grad(loss)), platforms=('cpu',))(variables['params'])
  assert f'batch_group_count = {groups}' not in cpu.mlir_module()
  xla = jax.export.export(jax.jit(jax.grad(loss)), platforms=('tpu',))(variables['params'])
  assert f'batch_group_count = {groups}' in xla.mlir_module()
