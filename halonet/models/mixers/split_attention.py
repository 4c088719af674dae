"""Split Attention (ResNeSt, Zhang et al. 2020) as timm's SplitAttn, one cardinal group: a 3x3
conv to `radix` splits of the output width (grouped by split), BN-act, and a softmax over the
splits per channel computed from their pooled sum by a bottleneck MLP. Strided by the conv."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.models import grouped_conv
from halonet.rounding import make_divisible


class SplitAttention(nn.Module):
  """Ends with its own BatchNorm and activation, as ResNeSt's bottleneck has none after it."""

  value_width: int
  stride: int
  norm: Callable[..., nn.Module]
  act: Callable[[jax.Array], jax.Array]
  radix: int = 2
  ratio: float = 0.25
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels, r = x.shape[-1], self.radix
    pad = ((self.stride - 1) + 2) // 2
    y = nn.Conv(
      self.value_width * r,
      (3, 3),
      strides=self.stride,
      padding=((pad, pad), (pad, pad)),
      feature_group_count=r,
      use_bias=False,
      dtype=self.dtype,
      conv_general_dilated=grouped_conv.grouped_conv if r > 1 else None,
      name='conv',
    )(x)
    y = self.act(self.norm(name='bn0')(y))
    splits = y.reshape(*y.shape[:3], r, self.value_width)
    s = splits.sum(axis=3).mean(axis=(1, 2))
    hidden = make_divisible(channels * r * self.ratio, 8, min_value=32)
    s = self.act(self.norm(name='bn1')(nn.Dense(hidden, dtype=self.dtype, name='fc1')(s)))
    s = nn.Dense(self.value_width * r, dtype=self.dtype, name='fc2')(s).reshape(
      -1, r, self.value_width
    )
    gate = jax.nn.softmax(s.astype(jnp.float32), axis=1) if r > 1 else jax.nn.sigmoid(s)
    return (splits * gate[:, None, None].astype(splits.dtype)).sum(axis=3)
