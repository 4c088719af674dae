"""Squeeze-and-excitation (Hu et al. 2018) as timm's SEModule: pool, MLP, sigmoid gate."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.rounding import make_divisible


class SqueezeExcite(nn.Module):
  """Gates each channel by an MLP of the globally pooled map: hidden width `ratio` of the
  channels, rounded to 8s (timm's rd_divisor), ReLU, biases."""

  ratio: float = 1 / 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    s = x.mean(axis=(1, 2), keepdims=True)
    hidden = make_divisible(channels * self.ratio, 8, round_limit=0.0)
    s = nn.relu(nn.Dense(hidden, dtype=self.dtype, name='fc1')(s))
    return x * nn.sigmoid(nn.Dense(channels, dtype=self.dtype, name='fc2')(s))
