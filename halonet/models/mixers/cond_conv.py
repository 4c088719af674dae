"""CondConv (Yang et al. 2019) as timm builds it: a 3x3 conv whose kernel is a per-example
mixture of `num_experts` kernels, weighted by sigmoid(routing(global mean of the input)).
Experts are stored as timm's CondConv2d stores them ([experts, out * in * 3 * 3])."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.models.mixers.per_example_conv import per_example_conv


class ExpertKernels(nn.Module):
  """The experts' kernels, combined per example: routing [B, E] -> kernels [B, 3, 3, I, O]."""

  in_width: int
  out_width: int
  num_experts: int

  @nn.compact
  def __call__(self, routing: jax.Array) -> jax.Array:
    shape = (self.out_width, self.in_width, 3, 3)  # PyTorch's OIHW, flattened per expert.
    init = nn.initializers.variance_scaling(
      2.0, 'fan_in', 'normal', in_axis=(2, 3, 4), out_axis=1, batch_axis=(0,)
    )

    def expert_init(rng, size):
      return init(rng, (self.num_experts, *shape)).reshape(size)

    weight = self.param('weight', expert_init, (self.num_experts, math.prod(shape)))
    kernels = (routing @ weight.astype(routing.dtype)).reshape(-1, *shape)
    return kernels.transpose(0, 3, 4, 2, 1)


class CondConv(nn.Module):
  """Plain conv semantics (no bias, symmetric padding), kernel per example."""

  value_width: int
  stride: int
  num_experts: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    routing = nn.sigmoid(
      nn.Dense(self.num_experts, dtype=self.dtype, name='routing')(x.mean(axis=(1, 2)))
    )
    kernels = ExpertKernels(x.shape[-1], self.value_width, self.num_experts, name='conv')(routing)
    return per_example_conv(x, kernels, self.stride)
