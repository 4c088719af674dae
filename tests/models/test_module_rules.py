"""Each survey module's defining property from its paper, without torch (the timm comparisons in
test_timm_modules.py need it): ECA's kernel size rule at the widths real networks use, and
Selective Kernel's path weights, a softmax over the paths per channel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halonet.models import conv_norm
from halonet.models.channel_attention import EfficientChannelAttention
from halonet.models.mixers import SelectiveKernel
from halonet.models.mixers.selective_kernel import SelectKernelAttention

# ECA-Net (Wang et al. 2020), eq. 12 with gamma = 2, b = 1: k = |log2(C) / 2 + 1 / 2|, taken to
# the odd number (t, or t + 1 when t is even, t the integer part), worked out by hand.
ECA_KERNEL = {64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}


@pytest.mark.parametrize('channels, kernel', ECA_KERNEL.items())
def test_eca_kernel_size_follows_the_papers_rule(channels, kernel):
  x = jnp.zeros((1, 2, 2, channels))
  params = EfficientChannelAttention().init(jax.random.key(0), x)['params']
  assert params['kernel'].shape == (kernel, 1, 1)


def test_eca_gates_each_channel_from_its_neighbours_only():
  """A 1-D conv of size k across the pooled channels: channel c's gate moves when channel
  c + k // 2 changes, not when c + k // 2 + 1 does."""
  channels, k = 64, ECA_KERNEL[64]
  module = EfficientChannelAttention()
  x = jnp.ones((1, 2, 2, channels))
  params = module.init(jax.random.key(0), x)
  gate = lambda x: module.apply(params, x)[0, 0, 0] / x[0, 0, 0]
  base = gate(x)
  near = gate(x.at[..., 10 + k // 2].set(3.0))
  far = gate(x.at[..., 10 + k // 2 + 1].set(3.0))
  assert near[10] != base[10] and far[10] == base[10]


def test_selective_kernel_path_weights_are_a_softmax_over_paths_per_channel():
  norm = conv_norm.batch_norm(train=False, dtype=jnp.float32)
  paths = jax.random.normal(jax.random.key(0), (3, 2, 5, 5, 16))
  module = SelectKernelAttention(norm=norm, hidden=8, dtype=jnp.float32)
  variables = module.init(jax.random.key(1), paths)
  weights = np.asarray(module.apply(variables, paths))
  assert weights.shape == (3, 2, 1, 1, 16)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
  assert (weights > 0).all() and (weights < 1).all()
  assert np.ptp(weights[:, 0], axis=-1).max() > 0  # Weighted per channel, not one per path.


def test_selective_kernel_output_is_its_paths_mixed_by_those_weights():
  norm = conv_norm.batch_norm(train=False, dtype=jnp.float32)
  module = SelectiveKernel(value_width=8, stride=1, norm=norm, act=jax.nn.relu, kernels=(3, 5))
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
  variables = module.init(jax.random.key(1), x)
  seen = {}

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, SelectKernelAttention):
      seen['paths'], seen['weights'] = np.asarray(args[0]), np.asarray(out)
    return out

  with nn.intercept_methods(spy):
    out = np.asarray(module.apply(variables, x))
  np.testing.assert_allclose(out, (seen['paths'] * seen['weights']).sum(axis=1), rtol=1e-5)
