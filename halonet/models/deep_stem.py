"""The deep stems of timm's 'd' and 't' ResNets (Bag of Tricks, He et al. 2019): three 3x3
convs in place of the 7x7 (stride 2, then 1, 1), each with BatchNorm and ReLU, then the 3x3/2
max-pool. 'deep' has widths 32, 32, 64 (resnet50d, ecaresnet50d, resnest50d); 'tiered' has
24, 32, 64 (the 't' networks). The same receptive field as the 7x7 conv, for a few more FLOPs."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

WIDTHS = {'deep': (32, 32, 64), 'tiered': (24, 32, 64)}


class DeepStem(nn.Module):
  """Stride 4, 64 channels out, as the 7x7 conv stem gives."""

  kind: str  # A key of WIDTHS.
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(WIDTHS[self.kind], 1):
      x = nn.Conv(
        width,
        (3, 3),
        strides=2 if i == 1 else 1,
        padding=((1, 1), (1, 1)),
        use_bias=False,
        dtype=self.dtype,
        name=f'conv{i}',
      )(x)
      x = nn.relu(self.norm(name=f'bn{i}')(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
