"""BoTNet's global multi-head self-attention (Srinivas et al. 2021; timm's BottleneckAttn): every
pixel attends to the whole map, with factorized relative position logits; strided by a 2 x 2
mean after the attention. It is the halo layer with one block covering the map and no halo."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.attention.choose import AttentionPlan
from halonet.attention.layer import HaloAttention
from halonet.models.mixers.pooling import downsample


class GlobalAttention(nn.Module):
  """All-pairs attention over the map; its position tables are sized by the map it first sees
  (as BoTNet's are by feat_size), so a model takes one image size."""

  value_width: int
  stride: int
  qk_width: int
  num_heads: int
  attention: AttentionPlan = AttentionPlan()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = HaloAttention(
      qk_width=self.qk_width,
      value_width=self.value_width,
      num_heads=self.num_heads,
      block_size=max(x.shape[1:3]),
      halo_size=0,
      attention=self.attention,
      dtype=self.dtype,
      name='self_attn',
    )(x)
    return downsample(y, self.stride)
