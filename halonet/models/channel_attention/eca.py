"""Efficient channel attention (Wang et al. 2020) as timm's EcaModule: SE without its MLP's
bottleneck, a 1-D conv across neighbouring channels instead."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class EfficientChannelAttention(nn.Module):
  """A 1-D conv over the pooled channels, its odd kernel size growing with log2(channels), no
  bias, sigmoid gate."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    t = int(abs(math.log(channels, 2) + 1) / 2)
    size = max(t if t % 2 else t + 1, 3)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (size, 1, 1))
    pooled = x.mean(axis=(1, 2))[..., None]  # [batch, channels, 1]: channels as the length.
    y = jax.lax.conv_general_dilated(
      pooled.astype(self.dtype),
      kernel.astype(self.dtype),
      (1,),
      [((size - 1) // 2, (size - 1) // 2)],
      dimension_numbers=('NWC', 'WIO', 'NWC'),
    )
    return x * nn.sigmoid(y[..., 0])[:, None, None, :]
