"""SASA's position-aware attention stem (Ramachandran et al. 2019, appendix): attention within
each 4 x 4 block of the image, whose values depend on where the key sits in the block,

  v_ab = (sum_m p(a, b, m) W_V^m) x_ab,   p(a, b, m) = softmax_m((e_row(a) + e_col(b)) . nu_m),

with M value matrices W_V^m, learned row/column position embeddings e and mixture embeddings nu;
then BatchNorm and a 4 x 4 max-pool: 224 px in, 56 x 56 out, as the conv stem gives. Pixels are
individually uninformative, so the spatially-varying values play the part of a conv's taps.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.attention.choose import AttentionPlan
from halonet.attention.layer import HaloAttention
from halonet.attention.layer import HeadProjection

STEM_BLOCK = 4  # The stem's attention block and max-pool side: its total stride.


class SpatiallyAwareAttention(HaloAttention):
  """HaloAttention (h = 0) with keys projected as usual and values mixed by key position."""

  num_mixtures: int = 4

  def keys_and_values(self, x: jax.Array, dk: int, dv: int) -> tuple[jax.Array, jax.Array]:
    n, m, b = self.num_heads, self.num_mixtures, self.block_size
    _, height, width, _ = x.shape
    keys = HeadProjection(n, dk, dtype=self.dtype, name='key')(x)
    # All M value maps at once: [B, H, W, M, heads * dv].
    values = HeadProjection(m, n * dv, dtype=self.dtype, name='value')(x)
    values = values.reshape(*values.shape[:3], m, n * dv)
    init = nn.initializers.normal(1.0)
    rows = self.param('value_row_embedding', init, (b, dk))
    cols = self.param('value_col_embedding', init, (b, dk))
    mixtures = self.param('mixture_embedding', init, (m, dk))
    # p(a, b, m) for each place in the block, tiled over the map (blocks start at row/column 0).
    logits = jnp.einsum('abd,md->abm', rows[:, None] + cols[None], mixtures)
    p = jax.nn.softmax(logits, axis=-1)
    p = p[jnp.arange(height) % b][:, jnp.arange(width) % b].astype(values.dtype)
    return keys, jnp.einsum('bhwmc,hwm->bhwc', values, p)


class AttentionStem(nn.Module):
  """[B, s, s, 3] -> [B, s / 4, s / 4, width]: attention, BatchNorm, 4 x 4 max-pool."""

  width: int
  num_heads: int
  norm: Callable[..., nn.Module]
  num_mixtures: int = 4
  attention: AttentionPlan = AttentionPlan()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = SpatiallyAwareAttention(
      qk_width=self.width,
      value_width=self.width,
      num_heads=self.num_heads,
      block_size=STEM_BLOCK,
      halo_size=0,
      num_mixtures=self.num_mixtures,
      attention=self.attention,
      position_embedding='split',
      dtype=self.dtype,
      name='attention',
    )(images)
    x = self.norm(name='bn')(x)
    pad = [(0, -size % STEM_BLOCK) for size in x.shape[1:3]]
    return nn.max_pool(x, (STEM_BLOCK, STEM_BLOCK), (STEM_BLOCK, STEM_BLOCK), pad)
