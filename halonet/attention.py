"""Blocked local self-attention with haloing (HaloNet, Vaswani et al. 2021, section 2.1).

The feature map is cut into non-overlapping b x b query blocks. Each block attends to one shared
neighbourhood: the block plus a band of h pixels around it, (b+2h) x (b+2h) keys and values.

Border semantics. The paper pads the halo at the image border. Here padded positions are masked:
they never receive attention weight, so a query at the border attends only to real pixels. The
same mask makes any map size work: a map that b does not divide (H7 at s=600 has 75 x 75 and
38 x 38 maps with b=10) is padded up to a multiple of b, the padded keys are masked, and the output
is cropped back.

Data stays in blocked form. Keys and values are projected once into a padded map. The layer loops
over rows of query blocks. For each row it slices the b+2h map rows its neighbourhoods span (a
strip, no copy of the map), then cuts the strip's columns into overlapping windows with static
slices (no gather). Only one row's windows and logits exist at a time, so they stay in cache.

The backward pass is written by hand (jax.custom_vjp), as in FlashAttention: the forward pass
keeps only each query's log-sum-exp. The backward pass recomputes one row's logits from it and
adds the row's key/value gradient strip into the map gradient in place. Every product takes the
large operands in the layout they are stored in; only the small ones are transposed.

Strided attention (stride 2) subsamples the queries inside each block, keeping the neighbourhood
of the stride-1 layer; the output is ceil(H/2) x ceil(W/2), like a strided convolution.

Relative position logits are factorized (SASA, BoTNet): a learned row table and a column table,
each with one d-dimensional embedding per relative offset between a query in the block and a key
in its neighbourhood (2(b+h)-1 offsets), shared by the heads. logit = q.k + q.r_row + q.r_col, with
q scaled by 1/sqrt(d). Softmax runs in float32 whatever the compute dtype.
"""

from typing import Any, Callable

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


def _position_bias(valid: np.ndarray) -> np.ndarray:
  """0 where a key may be attended, a large negative logit where it may not."""
  return np.where(valid, 0.0, _MASKED_LOGIT).astype(np.float32)


def _blocked_attention(block: int, halo: int, num_block_rows: int, num_block_cols: int,
                       strip_stride: int, qk_dim: int, rows_per_step: int,
                       bias_h: np.ndarray, bias_w: np.ndarray) -> Callable:
  """Attention of query blocks over their neighbourhoods, with a hand-written backward pass.

  The returned function maps
    q: [rows, qy, nbw, qx, heads, dk], one row of query blocks per image and block row;
    kv_map: [images * strip_stride, b*nbw + 2h, heads, dk + dv], keys and values padded by h
      (row r's neighbourhoods are map rows start(r) .. start(r) + b + 2h);
    table_h, table_w: [qy or qx, b + 2h, dk], position embeddings per (query, key) offset;
  to [rows, qy, nbw, qx, heads, dv]. bias_h [nbh, qy or 1, b+2h] and bias_w [nbw, qx or 1, b+2h]
  mask keys (padding, mask_window) along each axis.
  """
  window, nbh, nbw = block + 2 * halo, num_block_rows, num_block_cols
  bias_w = jnp.asarray(bias_w)[:, None, None]  # [j, 1, 1, qx or 1, kx]: broadcast over heads, qy.

  def row_constants(rows: int) -> tuple[jax.Array, jax.Array]:
    """Each row of blocks' first kv_map row (no index math in the loop) and row mask bias."""
    block_row = np.arange(rows) % nbh
    starts = (np.arange(rows) // nbh) * strip_stride + block_row * block
    return jnp.asarray(starts, jnp.int32), jnp.asarray(bias_h[block_row])

  def take_strips(kv_map: jax.Array, starts: jax.Array) -> jax.Array:
    """[c, window, map width, heads, d]: the map rows each row of blocks attends to."""
    if starts.shape[0] == 1:
      return jax.lax.dynamic_slice_in_dim(kv_map, starts[0], window)[None]
    return kv_map[starts[:, None] + jnp.arange(window)]

  def add_strips(grad_map: jax.Array, starts: jax.Array, strips: jax.Array) -> jax.Array:
    """Adds strip gradients into the map gradient (neighbouring rows' strips overlap)."""
    if starts.shape[0] == 1:
      old = jax.lax.dynamic_slice_in_dim(grad_map, starts[0], window)
      return jax.lax.dynamic_update_slice_in_dim(grad_map, old + strips[0], starts[0], axis=0)
    return grad_map.at[starts[:, None] + jnp.arange(window)].add(strips)

  def windows_of(strip: jax.Array) -> jax.Array:
    """[window, map width, heads, d] -> [nbw, heads, window * window, d]: one static slice per
    block, written straight into the layout the attention products read."""
    windows = jnp.stack([strip[:, j * block:j * block + window] for j in range(nbw)])
    windows = windows.transpose(0, 3, 1, 2, 4)  # [nbw, heads, ky, kx, d]
    return windows.reshape(windows.shape[:2] + (window * window, windows.shape[-1]))

  def strip_of_windows(d_windows: jax.Array, strip_shape: jax.ShapeDtypeStruct) -> jax.Array:
    """Adjoint of windows_of (overlapping windows add up), as a few shifted blockings."""
    blocked = lambda strip: _extract_windows(strip, 1, block, halo, nbw).transpose(1, 3, 0, 2, 4)
    d_windows = d_windows.reshape(d_windows.shape[:2] + (window, window, d_windows.shape[-1]))
    return jax.linear_transpose(blocked, strip_shape)(d_windows)[0]

  # Constant 0/1 matrix that spreads row and column terms over the keys: a matmul instead of a
  # broadcast pass over the [queries, keys] logits, and, transposed, instead of two reductions in
  # the backward pass.
  spread = np.concatenate([np.repeat(np.eye(window), window, axis=0),
                           np.tile(np.eye(window), (window, 1))], axis=1)  # [keys, 2 window]

  def logits_of(q, k, table_h, table_w, bias_h):
    """[j, n, qy, qx, keys] float32 logits of one row of blocks; q is [j, n, qy, qx, dk]."""
    f32 = jnp.float32
    rel_h = jnp.einsum('jnyxd,yud->jnyxu', q, table_h, preferred_element_type=f32)
    rel_w = jnp.einsum('jnyxd,xvd->jnyxv', q, table_w, preferred_element_type=f32)
    rel = jnp.concatenate([rel_h + bias_h[:, None, :], rel_w + bias_w], axis=-1)
    logits = jnp.einsum('jnyxd,jnkd->jnyxk', q, k, preferred_element_type=f32)
    return logits + jnp.einsum('jnyxe,ke->jnyxk', rel, jnp.asarray(spread, f32))

  def row_inputs(q_row, strip, table_h, table_w, bias_h):
    """Queries [j, n, qy, qx, dk], keys, values [j, n, keys, d] and logits of one row of blocks."""
    q = q_row.transpose(1, 3, 0, 2, 4)
    kv = windows_of(strip)
    k, v = kv[..., :qk_dim], kv[..., qk_dim:]
    return q, k, v, logits_of(q, k, table_h, table_w, bias_h)

  def row_forward(q_row, strip, table_h, table_w, bias_h):
    """One row of blocks: output [qy, nbw, qx, heads, dv] and log-sum-exp [nbw, heads, qy, qx]."""
    q, _, v, logits = row_inputs(q_row, strip, table_h, table_w, bias_h)
    top = logits.max(axis=-1, keepdims=True)
    weights = jnp.exp(logits - top)
    total = weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum('jnyxk,jnkd->jnyxd', weights.astype(q.dtype), v,
                     preferred_element_type=jnp.float32)
    out = (out / total).astype(q.dtype)
    return out.transpose(2, 0, 3, 1, 4), (top + jnp.log(total))[..., 0]

  def row_backward(q_row, strip, table_h, table_w, bias_h, out_row, lse, d_out_row):
    """Gradients of one row of blocks: dq row, key/value strip, and both position tables."""
    dtype, f32 = q_row.dtype, jnp.float32
    q, k, v, logits = row_inputs(q_row, strip, table_h, table_w, bias_h)
    weights = jnp.exp(logits - lse[..., None])
    d_out = d_out_row.transpose(1, 3, 0, 2, 4)
    out = out_row.transpose(1, 3, 0, 2, 4)
    d_weights = jnp.einsum('jnyxd,jnkd->jnyxk', d_out, v, preferred_element_type=f32)
    d_logits = weights * (d_weights - (d_out.astype(f32) * out.astype(f32)).sum(-1, keepdims=True))
    d_rel = jnp.einsum('jnyxk,ke->jnyxe', d_logits, jnp.asarray(spread, f32)).astype(dtype)
    d_rel_h, d_rel_w = d_rel[..., :window], d_rel[..., window:]
    d_logits = d_logits.astype(dtype)
    d_q = (jnp.einsum('jnyxk,jnkd->jnyxd', d_logits, k, preferred_element_type=f32)
           + jnp.einsum('jnyxu,yud->jnyxd', d_rel_h, table_h, preferred_element_type=f32)
           + jnp.einsum('jnyxv,xvd->jnyxd', d_rel_w, table_w, preferred_element_type=f32))
    d_table_h = jnp.einsum('jnyxu,jnyxd->yud', d_rel_h, q, preferred_element_type=f32)
    d_table_w = jnp.einsum('jnyxv,jnyxd->xvd', d_rel_w, q, preferred_element_type=f32)
    # Key and value gradients as [.., d, keys]: the large operand keeps its [queries, keys] layout.
    d_k = jnp.einsum('jnyxd,jnyxk->jndk', q, d_logits, preferred_element_type=f32)
    d_v = jnp.einsum('jnyxd,jnyxk->jndk', d_out, weights.astype(dtype),
                     preferred_element_type=f32)
    d_kv = jnp.concatenate([d_k, d_v], axis=2).astype(dtype).transpose(0, 1, 3, 2)
    d_strip = strip_of_windows(d_kv, jax.ShapeDtypeStruct(strip.shape, strip.dtype))
    return d_q.astype(dtype).transpose(2, 0, 3, 1, 4), d_strip, d_table_h, d_table_w

  def chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[rows, ...] -> [steps, chunk, ...], zero-padding the last chunk."""
    steps = -(-x.shape[0] // chunk)
    x = jnp.pad(x, [(0, steps * chunk - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((steps, chunk) + x.shape[1:])

  def loop(body, carry, xs, rows: int):
    """Runs body over chunks of rows (rows_per_step; 0 = all rows in one step, no loop)."""
    chunk = min(rows_per_step or rows, rows)
    xs = jax.tree_util.tree_map(lambda x: chunks(x, chunk), xs)
    if chunk == rows:
      carry, ys = body(carry, jax.tree_util.tree_map(lambda x: x[0], xs))
      ys = jax.tree_util.tree_map(lambda y: y[None], ys)
    else:
      carry, ys = jax.lax.scan(body, carry, xs)
    return carry, jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:])[:rows], ys)

  def forward(q, kv_map, table_h, table_w):
    rows = q.shape[0]

    def body(_, xs):
      q_rows, starts, biases = xs
      strips = take_strips(kv_map, starts)
      step = jax.vmap(row_forward, in_axes=(0, 0, None, None, 0))
      return None, step(q_rows, strips, table_h, table_w, biases)

    _, (out, lse) = loop(body, None, (q, *row_constants(rows)), rows)
    return out, lse

  @jax.custom_vjp
  def attention(q, kv_map, table_h, table_w):
    return forward(q, kv_map, table_h, table_w)[0]

  def attention_fwd(q, kv_map, table_h, table_w):
    out, lse = forward(q, kv_map, table_h, table_w)
    return out, (q, kv_map, table_h, table_w, out, lse)

  def attention_bwd(residuals, d_out):
    q, kv_map, table_h, table_w, out, lse = residuals
    rows = q.shape[0]

    def body(carry, xs):
      d_map, d_table_h, d_table_w = carry
      q_rows, starts, biases, out_rows, lse_rows, d_out_rows = xs
      step = jax.vmap(row_backward, in_axes=(0, 0, None, None, 0, 0, 0, 0))
      d_q, d_strips, d_th, d_tw = step(q_rows, take_strips(kv_map, starts), table_h, table_w,
                                       biases, out_rows, lse_rows, d_out_rows)
      carry = (add_strips(d_map, starts, d_strips), d_table_h + d_th.sum(0),
               d_table_w + d_tw.sum(0))
      return carry, d_q

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    carry = (jnp.zeros_like(kv_map), zeros(table_h), zeros(table_w))
    # Padded rows of the last chunk get a zero output gradient, so they add nothing.
    (d_map, d_table_h, d_table_w), d_q = loop(
        body, carry, (q, *row_constants(rows), out, lse, d_out), rows)
    return d_q, d_map, d_table_h.astype(table_h.dtype), d_table_w.astype(table_w.dtype)

  attention.defvjp(attention_fwd, attention_bwd)
  return attention


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
    rows_per_step: rows of blocks attended per loop step; 0 does all rows in one vectorised
      pass, with no loop: more memory, and the form whose FLOPs XLA's cost analysis counts in
      full (it counts a loop body once).
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
    dense = lambda features, name: nn.DenseGeneral(
        features, use_bias=False, dtype=self.dtype, name=name,
        kernel_init=nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'))

    # Queries: subsample, pad to whole blocks, split into rows of blocks (a free reshape).
    q = dense((n, dk), 'query')(x[:, ::s, ::s])
    q = q * (dk ** -0.5)
    out_h, out_w = q.shape[1], q.shape[2]
    q = jnp.pad(q, ((0, 0), (0, nbh * bq - out_h), (0, nbw * bq - out_w), (0, 0), (0, 0)))
    q = q.reshape(batch * nbh, bq, nbw, bq, n, dk)  # [rows, qy, nbw, qx, heads, dk]

    # Keys and values: projected once at full resolution into a map padded by h on every side
    # (and up to whole blocks), images stacked along the rows.
    kv = dense((n, dk + dv), 'key_value')(x)
    strip_stride = nbh * b + 2 * h
    kv = jnp.pad(kv, ((0, 0), (h, strip_stride - h - height), (h, nbw * b + h - width),
                      (0, 0), (0, 0)))
    kv_map = kv.reshape((batch * strip_stride,) + kv.shape[2:])

    # Masks as additive biases on the row and column position terms (both small): padded keys,
    # and keys outside mask_window.
    valid_h, valid_w = _key_validity(height, b, h, nbh), _key_validity(width, b, h, nbw)
    if self.mask_window:
      near = _window_mask(b, h, s, self.mask_window)
      valid_h, valid_w = valid_h[:, None] & near, valid_w[:, None] & near  # [blocks, q, keys]
    else:
      valid_h, valid_w = valid_h[:, None], valid_w[:, None]

    attention = _blocked_attention(b, h, nbh, nbw, strip_stride, dk, self.rows_per_step,
                                   _position_bias(valid_h), _position_bias(valid_w))
    out = attention(q, kv_map, *self._relative_tables(dk))
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
