"""SASA's local self-attention (Ramachandran et al. 2019): each pixel attends to the k x k
window centred on it, with SASA's relative embeddings (row- and column-offset embeddings of half
the head width each, concatenated), downsampling by a 2 x 2 mean after the attention.

It is the halo layer with h = k // 2 and a k x k mask: b = 1 is SASA literally (one query per
block), a larger b the same function computed block-wise (HaloNet's efficient form: one shared
(b + k - 1)^2 neighbourhood per b x b block, each query masked to its own window).
tests/models/test_mixers.py checks both against a per-pixel reference.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.attention.choose import AttentionPlan
from halonet.attention.layer import HaloAttention
from halonet.models.mixers.pooling import downsample


class LocalAttention(nn.Module):
  """Centred k x k window attention; output width value_width, no output projection."""

  value_width: int
  stride: int
  qk_width: int
  num_heads: int
  window: int = 7
  block_size: int = 8
  attention: AttentionPlan = AttentionPlan()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = HaloAttention(
      qk_width=self.qk_width,
      value_width=self.value_width,
      num_heads=self.num_heads,
      block_size=self.block_size,
      halo_size=self.window // 2,
      mask_window=self.window,
      attention=self.attention,
      position_embedding='split',
      dtype=self.dtype,
      name='attention',
    )(x)
    return downsample(y, self.stride)
