"""Blocked local self-attention with haloing (HaloNet, Vaswani et al. 2021, section 2.1).

The feature map is cut into non-overlapping b x b query blocks. Each block attends to one shared
neighbourhood: the block plus a band of h pixels around it, (b+2h) x (b+2h) keys and values.

This file is the plain form, the default on TPU and GPU: every step keeps the batch axis in front,
so under a data-sharded batch each device attends only over its own images, and there is no loop.

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

Other implementations of steps 3-5 take the same prepared inputs (`attention_impl`): `rows`
(halonet/attention_rows.py) is the CPU fast path; `pallas` (halonet/attention_pallas.py) fuses
them into one TPU kernel per direction that keeps the logits and windows out of HBM. 'auto' picks
per backend; see `resolve_impl`.

Under a mesh whose 'spatial' axis splits image rows, the map is padded to whole block rows per
device and steps 3-5 run per device after a halo exchange (halonet/attention_spatial.py).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from halonet import attention_pallas
from halonet import attention_rows
from halonet import attention_spatial
from halonet import errors

# The collection the layer sows its attention weights into when it is mutable (the plain form
# then computes them, whatever attention_impl says; the forms agree, tests/test_attention.py).
ATTENTION_WEIGHTS = 'attention_weights'
# Added to masked logits: finite, so a query whose whole window is padding (only possible in the
# cropped-away padded region) gets finite weights instead of NaN.
MASKED_LOGIT = -1e30


def plain_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: jax.Array,
                    rel_w: jax.Array, bias_h: jax.Array, bias_w: jax.Array, *, block_size: int,
                    halo_size: int, num_heads: int, with_weights: bool = False) -> Any:
  """Each query block's softmax attention over its neighbourhood, all blocks at once.

  Every implementation (`IMPLEMENTATIONS`) takes these arguments and returns this result.

  Args:
    q: [batch, nbh*qy, nbw*qx, heads*dk] queries, padded to nbh x nbw blocks of qy x qx.
    k, v: [batch, nbh*b + 2h, nbw*b + 2h, heads*dk (k) or heads*dv (v)] keys and values, padded
      by h. Heads sit side by side in the channels (see HeadProjection).
    rel_h, rel_w: [qy, b+2h, dk] and [qx, b+2h, dk] position embedding of each (query row, key
      row) and (query column, key column) pair of a block.
    bias_h, bias_w: [nbh, qy or 1, b+2h] and [nbw, qx or 1, b+2h] additive masks (0 or
      MASKED_LOGIT) per block row / column.
    num_heads: heads.
  Returns:
    [batch, nbh*qy, nbw*qx, heads*dv] in q's dtype; with `with_weights`, also the attention
    weights [batch, nbh, nbw, heads, qy, qx, b+2h, b+2h] (float32) over each neighbourhood.
  """
  b, h, heads = block_size, halo_size, num_heads
  (qy, window, dk), qx = rel_h.shape, rel_w.shape[0]
  batch, nbh, nbw = q.shape[0], q.shape[1] // qy, q.shape[2] // qx
  f32 = jnp.float32
  q = q.reshape(batch, nbh, qy, nbw, qx, heads, dk)
  # [batch, nbh, ky, nbw, kx, heads, d]: rows of neighbourhoods, then their columns.
  windows = lambda x: neighbourhoods(neighbourhoods(x, 1, b, h, nbh), 3, b, h, nbw).reshape(
      batch, nbh, window, nbw, window, heads, -1)
  k, v = windows(k), windows(v)

  content = jnp.einsum('biyjxnd,biujvnd->bijnyxuv', q, k, preferred_element_type=f32)
  row = jnp.einsum('biyjxnd,yud->bijnyxu', q, rel_h, preferred_element_type=f32)
  col = jnp.einsum('biyjxnd,xvd->bijnyxv', q, rel_w, preferred_element_type=f32)
  row = row + bias_h[None, :, None, None, :, None, :]
  col = col + bias_w[None, None, :, None, None, :, :]
  logits = content + row[..., :, None] + col[..., None, :]

  # Softmax over the whole neighbourhood (both key axes at once), in float32.
  probabilities = jax.nn.softmax(logits.reshape(logits.shape[:-2] + (-1,)), axis=-1)
  probabilities = probabilities.reshape(logits.shape)
  weights = probabilities.astype(q.dtype)
  out = jnp.einsum('bijnyxuv,biujvnd->biyjxnd', weights, v,
                   preferred_element_type=f32).astype(q.dtype)
  out = out.reshape(batch, nbh * qy, nbw * qx, -1)
  return (out, probabilities) if with_weights else out


def neighbourhoods(x: jax.Array, axis: int, block: int, halo: int, num_blocks: int) -> jax.Array:
  """Splits `axis` (padded by `halo` in front) into num_blocks overlapping (block+2*halo) windows.

  The axis becomes two, (num_blocks, block + 2 * halo). Window j starts at j * block: it is the
  concatenation of block-aligned slices shifted by 0, block, 2*block, ... (ceil((b+2h)/b) of
  them, usually 2), so it costs a few static slices whatever the map size.
  """
  window = block + 2 * halo
  shifts = -(-window // block)
  needed = (num_blocks + shifts - 1) * block
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, max(needed - x.shape[axis], 0))
  x = jnp.pad(x, pad)
  blocked = []
  for t in range(shifts):
    part = jax.lax.slice_in_dim(x, t * block, t * block + num_blocks * block, axis=axis)
    blocked.append(part.reshape(x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1:]))
  windows = jnp.concatenate(blocked, axis=axis + 1)
  return jax.lax.slice_in_dim(windows, 0, window, axis=axis + 1)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    'plain': plain_attention,
    'rows': attention_rows.rows_attention,
    'pallas': attention_pallas.pallas_attention,
}
# What 'auto' picks on each backend: the loop-free plain form on TPU and GPU; on CPU the row loop
# with its hand-written backward pass, which keeps one row's logits in cache (bench/run.py).
# The Pallas kernel is opt-in on TPU until it is timed on one (bench/pallas.py --check).
AUTO_IMPLEMENTATION = {'cpu': 'rows'}


def resolve_impl(attention_impl: str, backend: str | None = None) -> str:
  """The implementation `attention_impl` names; 'auto' picks by backend (default: JAX's).

  Raises one line if the implementation cannot run on the backend.
  """
  backend = backend or jax.default_backend()
  if attention_impl == 'auto':
    return AUTO_IMPLEMENTATION.get(backend, 'plain')
  if attention_impl == 'pallas':
    attention_pallas.check_backend(backend)
  return attention_impl


def check_attention_args(block_size: int, halo_size: int, stride: int, mask_window: int,
                         attention_impl: str = 'auto') -> None:
  """Raises ValueError naming the first bad attention hyper-parameter."""
  if block_size <= 0:
    raise errors.ConfigError(f'block_size={block_size} must be positive')
  if halo_size < 0:
    raise errors.ConfigError(f'halo_size={halo_size} must be >= 0')
  if stride not in (1, 2):
    raise errors.ConfigError(f'stride={stride} must be 1 or 2')
  if block_size % stride:
    raise errors.ConfigError(
        f'block_size={block_size} must be a multiple of the attention stride {stride}')
  if mask_window < 0 or (mask_window and mask_window % 2 == 0):
    raise errors.ConfigError(f'mask_window={mask_window} must be 0 (off) or a positive odd size')
  if mask_window > 2 * halo_size + 1:
    raise errors.ConfigError(
        f'mask_window={mask_window} does not fit in the neighbourhood of halo_size={halo_size}; '
        f'use at most {2 * halo_size + 1}')
  if attention_impl != 'auto' and attention_impl not in IMPLEMENTATIONS:
    raise errors.ConfigError(f'attention_impl={attention_impl!r} is not one of '
                     f"{['auto', *IMPLEMENTATIONS]}")


def num_relative_offsets(block_size: int, halo_size: int) -> int:
  """Relative offsets along one axis between a block's queries and its neighbourhood's keys."""
  return 2 * (block_size + halo_size) - 1


def key_bias(size: int, block: int, halo: int, stride: int, mask_window: int,
             num_blocks: int | None = None) -> np.ndarray:
  """[blocks, queries or 1, b+2h] additive mask along one axis: padding, then mask_window.

  `num_blocks` (default: the fewest that cover `size`) may add blocks of padding only.
  """
  num_blocks = num_blocks or -(-size // block)
  starts = np.arange(num_blocks)[:, None, None] * block - halo
  keys = np.arange(block + 2 * halo)
  valid = (starts + keys >= 0) & (starts + keys < size)  # [blocks, 1, keys]
  if mask_window:
    queries = np.arange(0, block, stride)[:, None] + halo  # In window coordinates.
    valid = valid & (np.abs(keys - queries) <= mask_window // 2)
  return np.where(valid, 0.0, MASKED_LOGIT).astype(np.float32)


def relative_index(block: int, halo: int, stride: int) -> np.ndarray:
  """[queries, keys] index into a relative table for each (query, key) pair along one axis."""
  queries = np.arange(0, block, stride)[:, None]
  keys = np.arange(block + 2 * halo)[None, :]
  return keys - queries + block - 1  # Offset key - (query + halo), shifted to start at 0.


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
    kernel = self.param('kernel', lambda rng, shape: init(rng, (channels, self.heads * self.width))
                        .reshape(shape), (channels, self.heads, self.width))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    edges = np.cumsum((0, *(self.parts or (self.width,))))
    maps = [jnp.dot(x, kernel[..., start:end].reshape(channels, -1))
            for start, end in zip(edges[:-1], edges[1:])]
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
    attention_impl: 'plain', 'rows', 'pallas' (TPU), or 'auto' (by backend, see `resolve_impl`).
    dtype: compute dtype of projections and attention products; params stay float32.
  """
  qk_width: int
  value_width: int
  num_heads: int
  block_size: int
  halo_size: int
  stride: int = 1
  mask_window: int = 0
  attention_impl: str = 'auto'
  dtype: Any = jnp.float32

  def setup(self):
    check_attention_args(self.block_size, self.halo_size, self.stride, self.mask_window,
                         self.attention_impl)
    for name, width in (('qk_width', self.qk_width), ('value_width', self.value_width)):
      if width % self.num_heads:
        raise errors.ConfigError(f'num_heads={self.num_heads} does not divide {name}={width}')

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, _ = x.shape
    b, h, s, n = self.block_size, self.halo_size, self.stride, self.num_heads
    dk, dv = self.qk_width // n, self.value_width // n
    nbh, nbw = -(-height // b), -(-width // b)
    bq = b // s  # Queries per block side after subsampling.
    # Image rows split over a 'spatial' mesh axis: whole block rows per device, the h halo rows
    # exchanged between neighbours (attention_spatial.py) instead of padded here.
    spatial = attention_spatial.applies(batch)
    if spatial:
      nbh = attention_spatial.padded_block_rows(nbh)
    halo_rows = 0 if spatial else h

    # Queries: subsample, project, pad to whole blocks of bq x bq.
    q = HeadProjection(n, dk, dtype=self.dtype, name='query')(x[:, ::s, ::s]) * (dk ** -0.5)
    out_h, out_w = q.shape[1], q.shape[2]
    q = jnp.pad(q, ((0, 0), (0, nbh * bq - out_h), (0, nbw * bq - out_w), (0, 0)))

    # Keys and values: projected once, padded by h on every side (and up to whole blocks).
    k, v = HeadProjection(n, dk + dv, parts=(dk, dv), dtype=self.dtype, name='key_value')(x)
    pad = ((0, 0), (halo_rows, nbh * b + halo_rows - height), (h, nbw * b + h - width), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)

    # Factorized relative position tables, indexed (statically) per (query, key) pair.
    init = nn.initializers.normal(dk ** -0.5)
    index = relative_index(b, h, s)
    rel_h = self.param('relative_height', init, (num_relative_offsets(b, h), dk))
    rel_w = self.param('relative_width', init, (num_relative_offsets(b, h), dk))
    rel_h, rel_w = rel_h.astype(self.dtype)[index], rel_w.astype(self.dtype)[index]

    bias_h = jnp.asarray(key_bias(height, b, h, s, self.mask_window, nbh))
    bias_w = jnp.asarray(key_bias(width, b, h, s, self.mask_window))
    attend = IMPLEMENTATIONS[resolve_impl(self.attention_impl)]
    if spatial:
      attend = functools.partial(attention_spatial.spatial_attention, attend)
    if self.is_mutable_collection(ATTENTION_WEIGHTS) and not self.is_initializing():
      # Asked for the weights (halonet/visualize.py).
      if spatial:
        raise errors.ConfigError('attention weights are recorded on unpartitioned images only; '
                                 'use a mesh without a spatial axis')
      out, weights = plain_attention(q, k, v, rel_h, rel_w, bias_h, bias_w, block_size=b,
                                     halo_size=h, num_heads=n, with_weights=True)
      self.sow(ATTENTION_WEIGHTS, 'weights', weights)
    else:
      out = attend(q, k, v, rel_h, rel_w, bias_h, bias_w, block_size=b, halo_size=h,
                   num_heads=n)
    return out[:, :out_h, :out_w]
