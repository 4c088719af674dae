"""The ResNet 3x3 convolution: the spatial mixer of conv stages and of the ResNet baselines."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Conv3x3(nn.Module):
  """3x3 conv, no bias, symmetric padding; strided in the first block of a downsampling stage."""

  value_width: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(
      self.value_width,
      (3, 3),
      strides=self.stride,
      padding=((1, 1), (1, 1)),
      use_bias=False,
      dtype=self.dtype,
    )(x)
