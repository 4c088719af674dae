"""Blocked local self-attention with haloing (HaloNet, Vaswani et al. 2021, section 2.1).

The feature map is cut into non-overlapping b x b query blocks. Each block attends to one shared
neighbourhood: the block plus a band of h pixels around it, (b+2h) x (b+2h) keys and values.

Border semantics. The paper pads the halo at the image border. Here padded positions are masked:
they never receive attention weight, so a query at the border attends only to real pixels. The
same mask makes any map size work: a map that b does not divide (H7 at s=600 has 75 x 75 and
38 x 38 maps with b=10) is padded up to a multiple of b, the padded keys are masked, and the output
is cropped back.

Neighbourhoods are built from static slices and reshapes of the padded key/value map (no gather):
a window of b+2h rows starting at block i*b is the concatenation of m = ceil((b+2h)/b) consecutive
blockings of the map, offset by whole blocks, cropped to b+2h.

Strided attention (stride 2) subsamples the queries inside each block, keeping the neighbourhood
of the stride-1 layer; the output is ceil(H/2) x ceil(W/2), like a strided convolution.

Relative position logits are factorized (SASA, BoTNet): a learned row table and a column table,
each with one d-dimensional embedding per relative offset between a query in the block and a key
in its neighbourhood (2(b+h)-1 offsets), shared by the heads. logit = q.k + q.r_row + q.r_col, with
q scaled by 1/sqrt(d). Softmax runs in float32 whatever the compute dtype.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Added to masked logits: finite, so a query whose whole window is padding (only possible in the
# cropped-away padded region) gets finite weights instead of NaN.
_MASKED_LOGIT = -1e30


def check_attention_args(block_size: int, halo_size: int, stride: int, mask_window: int,
                         rows_per_step: int = 1) -> None:
  """Raises ValueError naming the first bad attention hyper-parameter."""
  if block_size <= 0:
    raise ValueError(f'block_size={block_size} must be positive')
  if halo_size < 0:
    raise ValueError(f'halo_size={halo_size} must be >= 0')
  if stride not in (1, 2):
    raise ValueError(f'stride={stride} must be 1 or 2')
  if block_size % stride:
    raise ValueError(f'block_size={block_size} must be a multiple of the attention stride {stride}')
  if mask_window < 0 or (mask_window and mask_window % 2 == 0):
    raise ValueError(f'mask_window={mask_window} must be 0 (off) or a positive odd size')
  if mask_window > 2 * halo_size + 1:
    raise ValueError(
        f'mask_window={mask_window} does not fit in the neighbourhood of halo_size={halo_size}; '
        f'use at most {2 * halo_size + 1}')
  if rows_per_step < 0:
    raise ValueError(f'rows_per_step={rows_per_step} must be >= 0 (0 = all rows at once)')


def num_relative_offsets(block_size: int, halo_size: int) -> int:
  """Relative offsets along one axis between a block's queries and its neighbourhood's keys."""
  return 2 * (block_size + halo_size) - 1


def _extract_windows(x: jax.Array, axis: int, block: int, halo: int, num_blocks: int) -> jax.Array:
  """Splits `axis` (already padded by `halo` in front) into overlapping (block+2*halo) windows.

  The axis is replaced by two: (num_blocks, block + 2 * halo).
  """
  window = block + 2 * halo
  shifts = -(-window // block)  # ceil(window / block) blockings cover one window.
  needed = (num_blocks + shifts - 1) * block
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, needed - x.shape[axis])
  x = jnp.pad(x, pad)
  blockings = []
  for t in range(shifts):
    part = jax.lax.slice_in_dim(x, t * block, t * block + num_blocks * block, axis=axis)
    blockings.append(part.reshape(x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1:]))
  windows = jnp.concatenate(blockings, axis=axis + 1)
  return jax.lax.slice_in_dim(windows, 0, window, axis=axis + 1)


def _key_validity(size: int, block: int, halo: int, num_blocks: int) -> np.ndarray:
  """[num_blocks, block+2h] bool: which neighbourhood positions along one axis are real pixels."""
  starts = np.arange(num_blocks)[:, None] * block - halo
  positions = starts + np.arange(block + 2 * halo)[None, :]
  return (positions >= 0) & (positions < size)


def _window_mask(block: int, halo: int, stride: int, mask_window: int) -> np.ndarray:
  """[queries, keys] bool along one axis: keys within mask_window // 2 of the query."""
  queries = np.arange(0, block, stride)[:, None] + halo  # Query positions in window coordinates.
  keys = np.arange(block + 2 * halo)[None, :]
  return np.abs(keys - queries) <= mask_window // 2


def _relative_index(block: int, halo: int, stride: int) -> np.ndarray:
  """[queries, keys] index into a relative table for each (query, key) pair along one axis."""
  queries = np.arange(0, block, stride)[:, None]
  keys = np.arange(block + 2 * halo)[None, :]
  return keys - queries + block - 1  # Offset key - (query + halo), shifted to start at 0.


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
    dtype: compute dtype of projections and attention products.
    rows_per_step: rows of blocks attended per loop step (recomputed in the backward pass);
      0 does all rows in one vectorised pass, with no loop: more memory, and the form whose
      FLOPs XLA's cost analysis counts in full (it counts a loop body once).
  """
  qk_width: int
  value_width: int
  num_heads: int
  block_size: int
  halo_size: int
  stride: int = 1
  mask_window: int = 0
  dtype: Any = jnp.float32
  rows_per_step: int = 1

  def setup(self):
    check_attention_args(self.block_size, self.halo_size, self.stride, self.mask_window,
                         self.rows_per_step)
    for name, width in (('qk_width', self.qk_width), ('value_width', self.value_width)):
      if width % self.num_heads:
        raise ValueError(f'num_heads={self.num_heads} does not divide {name}={width}')

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, _ = x.shape
    b, h, s, n = self.block_size, self.halo_size, self.stride, self.num_heads
    dk, dv = self.qk_width // n, self.value_width // n
    nbh, nbw = -(-height // b), -(-width // b)
    bq = b // s  # Queries per block side after subsampling.
    window = b + 2 * h
    dense = lambda features, name: nn.DenseGeneral(
        features, use_bias=False, dtype=self.dtype, name=name,
        kernel_init=nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'))

    # Queries: subsample, pad to whole blocks, split into rows of blocks (a free reshape).
    q = dense((n, dk), 'query')(x[:, ::s, ::s])
    q = q * (dk ** -0.5)
    out_h, out_w = q.shape[1], q.shape[2]
    q = jnp.pad(q, ((0, 0), (0, nbh * bq - out_h), (0, nbw * bq - out_w), (0, 0), (0, 0)))
    q = q.reshape(batch * nbh, bq, nbw, bq, n, dk)  # [rows, qy, nbw, qx, heads, dk]

    # Keys and values: project once at full resolution, then cut overlapping neighbourhoods.
    kv = dense((n, dk + dv), 'key_value')(x)
    kv = jnp.pad(kv, ((0, 0), (h, 0), (h, 0), (0, 0), (0, 0)))
    kv = _extract_windows(kv, 1, b, h, nbh)
    kv = _extract_windows(kv, 3, b, h, nbw)
    kv = kv.reshape(batch * nbh, window, nbw, window, n, dk + dv)  # [rows, ky, nbw, kx, heads, d]

    # Masks as additive biases on the row and column position terms (both small): padded keys,
    # and keys outside mask_window.
    valid_h, valid_w = _key_validity(height, b, h, nbh), _key_validity(width, b, h, nbw)
    if self.mask_window:
      near = _window_mask(b, h, s, self.mask_window)
      valid_h, valid_w = valid_h[:, None] & near, valid_w[:, None] & near  # [blocks, q, keys]
    else:
      valid_h, valid_w = valid_h[:, None], valid_w[:, None]
    bias = lambda valid: jnp.asarray(np.where(valid, 0.0, _MASKED_LOGIT), jnp.float32)
    bias_h = jnp.tile(bias(valid_h), (batch, 1, 1))  # [rows, qy or 1, ky]
    bias_w = bias(valid_w)  # [nbw, qx or 1, kx]
    # Constant 0/1 matrix that spreads row and column terms over the keys: one matmul instead of a
    # broadcast pass over the [queries, keys] logits, and one matmul again in the backward pass.
    spread = jnp.asarray(np.concatenate([np.repeat(np.eye(window), window, axis=0),
                                         np.tile(np.eye(window), (window, 1))], axis=1),
                         jnp.float32)  # [keys, 2 window]
    table_h, table_w = self._relative_tables(q.shape[-1])

    def attend(args: tuple[jax.Array, ...]) -> jax.Array:
      """Attention for one row of blocks of one image: [qy, nbw, qx, heads, dv]."""
      q, kv, bias_h = args
      k, v = kv[..., :dk], kv[..., dk:]
      rel_h = jnp.einsum('yjxnd,yud->jnyxu', q, table_h, preferred_element_type=jnp.float32)
      rel_w = jnp.einsum('yjxnd,xvd->jnyxv', q, table_w, preferred_element_type=jnp.float32)
      rel = jnp.concatenate([rel_h + bias_h[:, None, :], rel_w + bias_w[:, None, None]], axis=-1)
      logits = jnp.einsum('yjxnd,ujvnd->jnyxuv', q, k, preferred_element_type=jnp.float32)
      logits = (logits.reshape(nbw, n, bq * bq, window * window)
                + jnp.einsum('jnqe,ke->jnqk', rel.reshape(nbw, n, bq * bq, -1), spread))
      # Softmax with the normalisation applied to the (small) output instead of the weights.
      top = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
      weights = jnp.exp(logits - top)
      weights_uv = weights.astype(self.dtype).reshape(nbw, n, bq * bq, window, window)
      out = jnp.einsum('jnquv,ujvnd->jnqd', weights_uv, v, preferred_element_type=jnp.float32)
      out = (out / weights.sum(axis=-1, keepdims=True)).astype(self.dtype)
      return out.reshape(nbw, n, bq, bq, dv).transpose(2, 0, 3, 1, 4)

    # One row of blocks at a time, recomputed in the backward pass: a row's logits and its layout
    # changes stay in cache instead of streaming the whole layer's logits through memory.
    rows = q.shape[0]
    chunk = min(self.rows_per_step or rows, rows)
    out = jax.lax.map(jax.checkpoint(attend), (q, kv, bias_h),
                      batch_size=None if chunk == 1 else chunk)
    out = out.reshape(batch, nbh * bq, nbw * bq, n * dv)
    return out[:, :out_h, :out_w]

  def _relative_tables(self, dk: int) -> tuple[jax.Array, jax.Array]:
    """Row and column position embeddings for each (query, key) pair: [q, keys, dk] each."""
    b, h, s = self.block_size, self.halo_size, self.stride
    init = nn.initializers.normal(dk ** -0.5)
    offsets = num_relative_offsets(b, h)
    table_h = self.param('relative_height', init, (offsets, dk))
    table_w = self.param('relative_width', init, (offsets, dk))
    index = _relative_index(b, h, s)  # Static [queries, keys] indices into a small parameter.
    return table_h.astype(self.dtype)[index], table_w.astype(self.dtype)[index]
