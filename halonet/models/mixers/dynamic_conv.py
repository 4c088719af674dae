"""Dynamic Convolution (Chen et al. 2020): K parallel 3x3 kernels (with biases) aggregated per
example by attention pi = softmax(FC(ReLU(FC(global mean))) / temperature), sum_k pi_k = 1:

  y = (sum_k pi_k(x) W_k) * x + sum_k pi_k(x) b_k

K = 4 and a hidden width of C/4, the paper's. It anneals the temperature from 30 to 1 over the
first epochs; here it is a fixed field (1: the plain softmax)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.models.mixers.per_example_conv import per_example_conv


class DynamicConv(nn.Module):
  """The aggregated conv; the block's BatchNorm and activation follow it, as in the paper."""

  value_width: int
  stride: int
  num_kernels: int = 4
  reduction: int = 4
  temperature: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    channels, k = x.shape[-1], self.num_kernels
    s = x.mean(axis=(1, 2))
    s = nn.relu(
      nn.Dense(max(channels // self.reduction, 1), dtype=self.dtype, name='attention_fc1')(s)
    )
    logits = nn.Dense(k, dtype=self.dtype, name='attention_fc2')(s).astype(jnp.float32)
    weights = jax.nn.softmax(logits / self.temperature, axis=-1).astype(self.dtype)
    init = nn.initializers.variance_scaling(
      2.0, 'fan_in', 'normal', in_axis=(1, 2, 3), out_axis=4, batch_axis=(0,)
    )
    bank = self.param('kernels', init, (k, 3, 3, channels, self.value_width))
    biases = self.param('biases', nn.initializers.zeros, (k, self.value_width))
    kernels = jnp.einsum('bk,khwio->bhwio', weights, bank.astype(self.dtype))
    out = per_example_conv(x, kernels, self.stride)
    return out + (weights @ biases.astype(self.dtype))[:, None, None]
