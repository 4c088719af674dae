"""Bottleneck Attention Module (Park et al. 2018), placed after a stage, where the network's map
shrinks: F' = F + F * sigmoid(M_c(F) + M_s(F)), the two branches broadcast to C x H x W.

  M_c(F) = BN(W_1 ReLU(W_0 AvgPool(F) + b_0) + b_1)                 hidden C / r
  M_s(F) = BN(f_3(ReLU(BN(f_2(ReLU(BN(f_1(ReLU(BN(f_0(F))))))))))   f_0: 1x1 to C / r,
           f_1, f_2: 3x3 with dilation d, f_3: 1x1 to one map; biases on every conv

with r = 16 and d = 4, the paper's choices.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Bam(nn.Module):
  """The block's input plus the input times the joint channel-and-spatial gate."""

  norm: Callable[..., nn.Module]
  reduction: int = 16
  dilation: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    hidden = max(channels // self.reduction, 1)
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, name=name)

    pooled = x.mean(axis=(1, 2), keepdims=True)
    channel = self.norm(name='channel_bn')(
      dense(channels, 'channel_fc1')(nn.relu(dense(hidden, 'channel_fc0')(pooled)))
    )

    d = self.dilation
    spatial = nn.relu(self.norm(name='spatial_bn0')(dense(hidden, 'spatial_reduce')(x)))
    for i in (1, 2):
      conv = nn.Conv(
        hidden,
        (3, 3),
        padding=((d, d), (d, d)),
        kernel_dilation=d,
        dtype=self.dtype,
        name=f'spatial_dilated{i}',
      )
      spatial = nn.relu(self.norm(name=f'spatial_bn{i}')(conv(spatial)))
    spatial = self.norm(name='spatial_bn3')(dense(1, 'spatial_out')(spatial))
    return x + x * nn.sigmoid(channel + spatial)
