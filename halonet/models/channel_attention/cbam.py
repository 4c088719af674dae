"""CBAM (Woo et al. 2018) as timm's CbamModule: a channel gate from average- and max-pooled
features through one shared MLP, then a spatial gate from a 7x7 conv over the channel-wise mean
and max. Submodule names follow timm's, so its weights convert by name
(halonet/tools/convert.py)."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.models import conv_norm
from halonet.rounding import make_divisible


class ChannelGate(nn.Module):
  """The channel MLP (hidden `ratio` of the channels, no biases), shared by the average- and
  max-pooled vectors, whose outputs are summed before the sigmoid."""

  ratio: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    hidden = make_divisible(channels * self.ratio, 1, round_limit=0.0)
    fc1 = nn.Dense(hidden, use_bias=False, dtype=self.dtype, name='fc1')
    fc2 = nn.Dense(channels, use_bias=False, dtype=self.dtype, name='fc2')
    mlp = lambda s: fc2(nn.relu(fc1(s)))
    return x * nn.sigmoid(
      mlp(x.mean(axis=(1, 2), keepdims=True)) + mlp(x.max(axis=(1, 2), keepdims=True))
    )


class SpatialGate(nn.Module):
  """Per-pixel gate: the channels' mean and max, a k x k conv to one map, BatchNorm, sigmoid."""

  kernel: int
  norm: Callable[..., nn.Module]
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pooled = jnp.concatenate([x.mean(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)], -1)
    gate = conv_norm.ConvNormAct(1, self.kernel, self.norm, dtype=self.dtype, name='conv')
    return x * nn.sigmoid(gate(pooled))


class Cbam(nn.Module):
  """Channel gate, then spatial gate."""

  norm: Callable[..., nn.Module]
  ratio: float = 1 / 16
  spatial_kernel: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ChannelGate(self.ratio, self.dtype, name='channel')(x)
    return SpatialGate(self.spatial_kernel, self.norm, self.dtype, name='spatial')(x)
