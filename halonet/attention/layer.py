"""Blocked local self-attention with haloing (HaloNet, Vaswani et al. 2021, section 2.1).

The feature map is cut into non-overlapping b x b query blocks. Each block attends to one shared
neighbourhood: the block plus a band of h pixels around it, (b+2h) x (b+2h) keys and values.

  1. Queries, keys and values are 1x1 projections (no output projection), q scaled by 1/sqrt(d).
  2. Queries are cut into blocks: a free reshape of the map padded to whole blocks.
  3. Keys and values are padded by h on every side, and each block's (b+2h)^2 neighbourhood is
     cut out of the padded map with a few static slices and reshapes (no gather).
  4. logit = q.k + q.r_row + q.r_col: one einsum for the content term; the relative position
     terms come from two small factorized tables (SASA, BoTNet), one d-dim embedding per relative
     offset along each axis (2(b+h)-1 of them), shared by the heads.
  5. Softmax in float32 whatever the compute dtype, then one einsum with the values.

Border semantics. The paper pads the halo at the image border. Here padded positions are masked:
they never receive attention weight, so a query at the border attends only to real pixels. The
same mask makes any map size work: a map that b does not divide (H7 at s=600 has 75 x 75 and
38 x 38 maps with b=10) is padded up to a multiple of b, the padded keys are masked, and the output
is cropped back. `mask_window=k` further restricts each query to the k x k keys centred on it.

Strided attention (stride 2) subsamples the queries inside each block, keeping the neighbourhood
of the stride-1 layer; the output is ceil(H/2) x ceil(W/2), like a strided convolution.

This file is the layer: steps 1-2, the padding and position tables of steps 3-4, and the call to
one implementation of steps 3-5 (common.Attend): plain.py, the reference; rows.py, the CPU fast
path; pallas.py and pallas_gpu.py, fused TPU and GPU kernels that keep logits and windows out
of HBM; dense.py, each block as one fused attention call. Which one is the `attention` plan's
(choose.py), decided once when the network is built.

Under a mesh whose 'spatial' axis splits image rows, the map is padded to whole block rows per
device and steps 3-5 run per device after a halo exchange (spatial.py).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from halonet import errors
from halonet.attention import choose
from halonet.attention import plain
from halonet.attention import spatial as attention_spatial
from halonet.attention.common import POSITION_EMBEDDINGS
from halonet.attention.common import POSITION_INDEXINGS
from halonet.attention.common import check_attention_args
from halonet.attention.common import key_bias
from halonet.attention.common import num_relative_offsets
from halonet.attention.common import relative_index
from halonet.rounding import ceil_div

# The collection the layer sows its attention weights into when it is mutable (the plain form
# then computes them, whatever the plan says; the forms agree,
# tests/attention/test_attention.py).
ATTENTION_WEIGHTS = 'attention_weights'


def layer_shape(layer: 'HaloAttention', input_shape: tuple[int, ...]) -> choose.LayerShape:
  """The shape `layer` looks its form up by, for an NHWC input of `input_shape`: the one place a
  LayerShape is built (the layer, measure.py and a run's recorded choice all use it)."""
  _, height, width, channels = input_shape
  return choose.LayerShape(
    height=height,
    width=width,
    channels=channels,
    qk_width=layer.qk_width,
    value_width=layer.value_width,
    num_heads=layer.num_heads,
    block_size=layer.block_size,
    halo_size=layer.halo_size,
    stride=layer.stride,
    mask_window=layer.mask_window,
    dtype=jnp.dtype(layer.dtype).name,
  )


class HeadProjection(nn.Module):
  """A 1x1 projection to `heads` heads of `width` channels each, heads side by side.

  The parameter and its init are nn.DenseGeneral's (kernel [channels, heads, width]), but the
  output is one matmul into [..., heads * width]: a [..., heads, width] array would pad each
  head's 16-64 channels to a whole 128-lane tile on TPU, and every reshape of it is a copy.
  `parts` splits each head's width (e.g. keys and values of one kernel): one map per part.
  """

  heads: int
  width: int
  parts: tuple[int, ...] = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array | list[jax.Array]:
    channels = x.shape[-1]
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
    kernel = self.param(
      'kernel',
      lambda rng, shape: init(rng, (channels, self.heads * self.width)).reshape(shape),
      (channels, self.heads, self.width),
    )
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    edges = np.cumsum((0, *(self.parts or (self.width,))))
    maps = [
      jnp.dot(x, kernel[..., start:end].reshape(channels, -1))
      for start, end in zip(edges[:-1], edges[1:])
    ]
    return maps if self.parts else maps[0]


class HaloAttention(nn.Module):
  """Multi-head blocked local self-attention over NHWC maps.

  Attributes:
    qk_width: total query/key width (split over heads).
    value_width: total value width, which is also the output width (no output projection).
    num_heads: heads; must divide both widths.
    block_size: b, query block side in input pixels.
    halo_size: h, halo band width.
    stride: 1, or 2 for attention downsampling.
    mask_window: k > 0 restricts each query to the k x k keys centred on it (relaxed equivariance
      ablation); 0 lets it see the whole (b+2h)^2 neighbourhood.
    attention: which form runs ('plain', 'rows', 'pallas' on TPU, 'pallas_gpu' on GPU, 'dense'),
      for this layer's shape: the network's one plan (choose.AttentionPlan); plain by default.
    mask_padding: padded keys (beyond the map) get no weight; False keeps them as zero keys and
      values whose position logits still count, as timm's HaloAttn does (converted models).
    position_indexing: common.POSITION_INDEXINGS; 'window' for timm's models.
    position_embedding: 'factorized' (BoTNet, HaloNet: row and column embeddings of d_k each,
      added) or 'split' (SASA: a d_k/2 row embedding and a d_k - d_k/2 column one, concatenated).
    dtype: compute dtype of projections and attention products; params stay float32.
  """

  qk_width: int
  value_width: int
  num_heads: int
  block_size: int
  halo_size: int
  stride: int = 1
  mask_window: int = 0
  attention: choose.AttentionPlan = choose.AttentionPlan()
  dtype: Any = jnp.float32
  mask_padding: bool = True
  position_indexing: str = 'offset'
  position_embedding: str = 'factorized'

  def setup(self):
    check_attention_args(self.block_size, self.halo_size, self.stride, self.mask_window)
    if self.position_indexing not in POSITION_INDEXINGS:
      raise errors.ConfigError(
        f'position_indexing={self.position_indexing!r} is not one of {POSITION_INDEXINGS}'
      )
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise errors.ConfigError(
        f'position_embedding={self.position_embedding!r} is not one of {POSITION_EMBEDDINGS}'
      )
    for name, width in (('qk_width', self.qk_width), ('value_width', self.value_width)):
      if width % self.num_heads:
        raise errors.ConfigError(f'num_heads={self.num_heads} does not divide {name}={width}')

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    b, h, s, n = self.block_size, self.halo_size, self.stride, self.num_heads
    dk, dv = self.qk_width // n, self.value_width // n
    nbh, nbw = ceil_div(height, b), ceil_div(width, b)
    bq = b // s  # Queries per block side after subsampling.
    # Image rows split over a 'spatial' mesh axis: whole block rows per device, the h halo rows
    # exchanged between neighbours (spatial.py) instead of padded here.
    spatial = attention_spatial.applies(batch)
    if spatial:
      nbh = attention_spatial.padded_block_rows(nbh)
    halo_rows = 0 if spatial else h

    # Queries: subsample, project, pad to whole blocks of bq x bq.
    q = HeadProjection(n, dk, dtype=self.dtype, name='query')(x[:, ::s, ::s]) * (dk**-0.5)
    out_h, out_w = q.shape[1], q.shape[2]
    q = jnp.pad(q, ((0, 0), (0, nbh * bq - out_h), (0, nbw * bq - out_w), (0, 0)))

    # Keys and values: projected once, padded by h on every side (and up to whole blocks).
    k, v = self.keys_and_values(x, dk, dv)
    pad = ((0, 0), (halo_rows, nbh * b + halo_rows - height), (h, nbw * b + h - width), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)

    # Factorized relative position tables, indexed (statically) per (query, key) pair.
    init = nn.initializers.normal(dk**-0.5)
    index = relative_index(b, h, s, self.position_indexing)
    table_rows = num_relative_offsets(b, h, self.position_indexing)
    if self.position_embedding == 'split':
      # r_{a-i, b-j} = [r_row(a-i), r_col(b-j)]: q.r is the first half of q against the row
      # embedding plus the second half against the column one.
      rows = self.param('relative_height', init, (table_rows, dk // 2))
      cols = self.param('relative_width', init, (table_rows, dk - dk // 2))
      rel_h = jnp.pad(rows, ((0, 0), (0, dk - dk // 2)))
      rel_w = jnp.pad(cols, ((0, 0), (dk // 2, 0)))
    else:
      rel_h = self.param('relative_height', init, (table_rows, dk))
      rel_w = self.param('relative_width', init, (table_rows, dk))
    rel_h, rel_w = rel_h.astype(self.dtype)[index], rel_w.astype(self.dtype)[index]

    bias_h = jnp.asarray(key_bias(height, b, h, s, self.mask_window, nbh, self.mask_padding))
    bias_w = jnp.asarray(key_bias(width, b, h, s, self.mask_window, None, self.mask_padding))
    attend = self.attention.attend(layer_shape(self, x.shape))
    if spatial:
      attend = functools.partial(attention_spatial.spatial_attention, attend)
    if self.is_mutable_collection(ATTENTION_WEIGHTS) and not self.is_initializing():
      # Asked for the weights (halonet/tools/visualize.py).
      if spatial:
        raise errors.ConfigError(
          'attention weights are recorded on unpartitioned images only; '
          'use a mesh without a spatial axis'
        )
      out, weights = plain.plain_attention(
        q,
        k,
        v,
        rel_h,
        rel_w,
        bias_h,
        bias_w,
        block_size=b,
        halo_size=h,
        num_heads=n,
        with_weights=True,
      )
      self.sow(ATTENTION_WEIGHTS, 'weights', weights)
    else:
      out = attend(q, k, v, rel_h, rel_w, bias_h, bias_w, block_size=b, halo_size=h, num_heads=n)
    return out[:, :out_h, :out_w]

  def keys_and_values(self, x: jax.Array, dk: int, dv: int) -> tuple[jax.Array, jax.Array]:
    """Keys and values of every pixel, heads side by side: one 1x1 projection. A subclass with
    position-dependent values (the SASA stem) replaces this."""
    projection = HeadProjection(
      self.num_heads, dk + dv, parts=(dk, dv), dtype=self.dtype, name='key_value'
    )
    k, v = projection(x)
    return k, v
