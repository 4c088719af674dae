"""Gather-Excite (Hu et al. 2018) with global extent, as timm's GatherExcite builds it:

  θ⁻ ('ge_minus'): gather = the global mean (no parameters), excite = sigmoid of it;
  θ  ('ge'):       gather = a depthwise conv whose kernel covers the whole map, then BatchNorm;
  θ⁺ ('ge_plus'):  θ's gather, then SE's bottleneck MLP (1x1 convs with biases) before the gate.

Submodule names follow timm's (gather.conv1, gather.norm1, mlp.fc1, mlp.fc2).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.rounding import make_divisible


class MapWideDepthwiseConv(nn.Module):
  """A depthwise conv with one H x W kernel per channel, unpadded: a learned weighted sum over
  the map (one contraction, not a convolution; the kernel is laid out HWIO as flax's)."""

  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, height, width, channels = x.shape
    kernel = self.param(
      'kernel', nn.initializers.lecun_normal(), (height, width, 1, channels)
    ).astype(self.dtype)
    return jnp.einsum('bhwc,hwc->bc', x.astype(self.dtype), kernel[:, :, 0])[:, None, None]


class Gather(nn.Module):
  """θ and θ⁺'s gather: the map-wide depthwise conv and its BatchNorm."""

  norm: Callable[..., nn.Module]
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(name='norm1')(MapWideDepthwiseConv(self.dtype, name='conv1')(x))


class GatherExcite(nn.Module):
  """x times sigmoid(excite(gather(x))), the gate broadcast over the map."""

  norm: Callable[..., nn.Module]
  extra_params: bool = False
  use_mlp: bool = False
  ratio: float = 1 / 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.extra_params:
      gathered = Gather(self.norm, self.dtype, name='gather')(x)
    else:
      gathered = x.mean(axis=(1, 2), keepdims=True)
    if self.use_mlp:
      channels = x.shape[-1]
      hidden = make_divisible(channels * self.ratio, 1, round_limit=0.0)
      gathered = ConvMlp(hidden, self.dtype, name='mlp')(gathered)
    return x * nn.sigmoid(gathered)


class ConvMlp(nn.Module):
  """timm's ConvMlp: 1x1 conv to `hidden` channels, ReLU, 1x1 conv back, both with biases."""

  hidden: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x))
    return nn.Dense(channels, dtype=self.dtype, name='fc2')(x)
