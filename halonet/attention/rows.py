"""Halo attention one row of blocks at a time, with a hand-written backward pass: the CPU path.

Same inputs and result as `plain.plain_attention`; 'auto' picks it on CPU only. The plain form
writes every block's logits and 3x-overlapping key/value windows to memory; here a loop visits one
row of query blocks of one image at a time, slices the b+2h map rows its neighbourhoods span (a
strip) and cuts only that strip into windows, so one row's windows and logits stay in cache.

The loop folds images into rows, which is only data-parallel per device: under a mesh with a data
axis (`jax.set_mesh`, as training and evaluation run) the loop runs inside `jax.shard_map`, so
each device loops over its own images and the batch stays sharded (no all-gather).

The backward pass is written by hand (jax.custom_vjp), as in FlashAttention: the forward pass
keeps only each query's log-sum-exp; the backward pass recomputes one row's logits from it and
adds the row's key/value gradient strip into the map gradient in place. Every product takes the
large operands in the layout they are stored in; the position terms (and masks) are spread over
the keys by one constant 0/1 matmul, which XLA:CPU runs faster than a broadcast pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from halonet import sharding


def rows_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  rel_h: jax.Array,
  rel_w: jax.Array,
  bias_h: jax.Array,
  bias_w: jax.Array,
  *,
  block_size: int,
  halo_size: int,
  num_heads: int,
) -> jax.Array:
  """`plain.plain_attention` (same arguments), looping over the rows of blocks of each image."""
  attend = functools.partial(
    _local_rows_attention, block=block_size, halo=halo_size, heads=num_heads
  )
  return sharding.per_device_images(attend)(q, k, v, rel_h, rel_w, bias_h, bias_w)


def _local_rows_attention(q, k, v, rel_h, rel_w, bias_h, bias_w, *, block, halo, heads):
  """The row loop over this device's images (arguments as in `rows_attention`)."""
  (qy, _, dk), qx = rel_h.shape, rel_w.shape[0]
  batch, nbh, nbw = q.shape[0], q.shape[1] // qy, q.shape[2] // qx
  q = q.reshape(batch, nbh, qy, nbw, qx, heads, dk)
  # The loop's layout: keys and values of a head side by side, [batch, rows, columns, heads, d].
  split = lambda x: x.reshape(x.shape[:3] + (heads, -1))
  kv_map = jnp.concatenate([split(k), split(v)], axis=-1)
  map_rows = kv_map.shape[1]
  # Images stacked along the rows: row i of blocks is image i // nbh, block row i % nbh, and its
  # strip starts at map row `starts[i]`. Both reshapes are free.
  rows = np.arange(batch * nbh)
  starts = jnp.asarray((rows // nbh) * map_rows + (rows % nbh) * block, jnp.int32)
  row_bias_h = bias_h[rows % nbh]
  attend = _row_loop(block, halo, dk)
  out = attend(
    q.reshape((batch * nbh,) + q.shape[2:]),
    kv_map.reshape((batch * map_rows,) + kv_map.shape[2:]),
    rel_h,
    rel_w,
    starts,
    row_bias_h,
    bias_w,
  )
  return out.reshape(batch, nbh * qy, nbw * qx, -1)


def _row_loop(block: int, halo: int, qk_dim: int):
  """Custom-VJP attention over (q rows, kv map, rel_h, rel_w, starts, row biases, bias_w)."""
  window = block + 2 * halo
  f32 = jnp.float32
  # Constant 0/1 matrix [keys, 2 * window] spreading row and column terms over the keys.
  spread = np.concatenate(
    [np.repeat(np.eye(window), window, axis=0), np.tile(np.eye(window), (window, 1))], axis=1
  ).astype(np.float32)

  def windows_of(strip: jax.Array, nbw: int) -> jax.Array:
    """[window, map width, heads, d] -> [nbw, heads, window * window, d], one slice per block."""
    windows = jnp.stack([strip[:, j * block : j * block + window] for j in range(nbw)])
    windows = windows.transpose(0, 3, 1, 2, 4)  # [nbw, heads, ky, kx, d]
    return windows.reshape(windows.shape[:2] + (window * window, windows.shape[-1]))

  def strip_of_windows(d_windows: jax.Array, strip: jax.Array) -> jax.Array:
    """Adjoint of windows_of: overlapping windows add up (`strip` gives only the type)."""
    return jax.linear_transpose(lambda s: windows_of(s, d_windows.shape[0]), strip)(d_windows)[0]

  def row_inputs(q_row, strip, rel_h, rel_w, bias_h, bias_w):
    """One row of blocks: q [j, n, qy, qx, dk], k, v [j, n, keys, d], float32 logits."""
    q = q_row.transpose(1, 3, 0, 2, 4)  # [qy, nbw, qx, n, dk] -> [nbw, n, qy, qx, dk]
    kv = windows_of(strip, q.shape[0])
    k, v = kv[..., :qk_dim], kv[..., qk_dim:]
    row = jnp.einsum('jnyxd,yud->jnyxu', q, rel_h, preferred_element_type=f32)
    col = jnp.einsum('jnyxd,xvd->jnyxv', q, rel_w, preferred_element_type=f32)
    rel = jnp.concatenate([row + bias_h[:, None, :], col + bias_w[:, None, None]], axis=-1)
    logits = jnp.einsum('jnyxd,jnkd->jnyxk', q, k, preferred_element_type=f32)
    return q, k, v, logits + jnp.einsum('jnyxe,ke->jnyxk', rel, jnp.asarray(spread))

  def row_forward(q_row, strip, rel_h, rel_w, bias_h, bias_w):
    """Output [qy, nbw, qx, n, dv] and log-sum-exp [nbw, n, qy, qx] of one row of blocks."""
    q, _, v, logits = row_inputs(q_row, strip, rel_h, rel_w, bias_h, bias_w)
    top = logits.max(axis=-1, keepdims=True)
    weights = jnp.exp(logits - top)
    total = weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum('jnyxk,jnkd->jnyxd', weights.astype(q.dtype), v, preferred_element_type=f32)
    out = (out / total).astype(q.dtype)
    return out.transpose(2, 0, 3, 1, 4), (top + jnp.log(total))[..., 0]

  def row_backward(q_row, strip, rel_h, rel_w, bias_h, bias_w, out_row, lse, d_out_row):
    """Gradients of one row of blocks: dq row, key/value strip, and both position tables."""
    dtype = q_row.dtype
    q, k, v, logits = row_inputs(q_row, strip, rel_h, rel_w, bias_h, bias_w)
    weights = jnp.exp(logits - lse[..., None])
    d_out = d_out_row.transpose(1, 3, 0, 2, 4)
    out = out_row.transpose(1, 3, 0, 2, 4)
    d_weights = jnp.einsum('jnyxd,jnkd->jnyxk', d_out, v, preferred_element_type=f32)
    d_logits = weights * (d_weights - (d_out.astype(f32) * out.astype(f32)).sum(-1, keepdims=True))
    # The position terms stay float32: they are small, and XLA:CPU cannot run some of their
    # bfloat16 products unfused (a DotThunk BF16 x BF16 = F32 error at one row of blocks).
    d_rel = jnp.einsum('jnyxk,ke->jnyxe', d_logits, jnp.asarray(spread))
    d_row, d_col = d_rel[..., :window], d_rel[..., window:]
    d_logits = d_logits.astype(dtype)
    d_q = (
      jnp.einsum('jnyxk,jnkd->jnyxd', d_logits, k, preferred_element_type=f32)
      + jnp.einsum('jnyxu,yud->jnyxd', d_row, rel_h.astype(f32))
      + jnp.einsum('jnyxv,xvd->jnyxd', d_col, rel_w.astype(f32))
    )
    d_rel_h = jnp.einsum('jnyxu,jnyxd->yud', d_row, q.astype(f32))
    d_rel_w = jnp.einsum('jnyxv,jnyxd->xvd', d_col, q.astype(f32))
    # Key and value gradients as [.., d, keys]: the large operand keeps its [queries, keys] layout.
    d_k = jnp.einsum('jnyxd,jnyxk->jndk', q, d_logits, preferred_element_type=f32)
    d_v = jnp.einsum('jnyxd,jnyxk->jndk', d_out, weights.astype(dtype), preferred_element_type=f32)
    d_kv = jnp.concatenate([d_k, d_v], axis=2).astype(dtype).transpose(0, 1, 3, 2)
    return (
      d_q.astype(dtype).transpose(2, 0, 3, 1, 4),
      strip_of_windows(d_kv, strip),
      d_rel_h,
      d_rel_w,
    )

  def strip_at(kv_map: jax.Array, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(kv_map, start, window)

  def forward(q, kv_map, rel_h, rel_w, starts, bias_h, bias_w):
    def body(_, xs):
      q_row, start, bias = xs
      return None, row_forward(q_row, strip_at(kv_map, start), rel_h, rel_w, bias, bias_w)

    return jax.lax.scan(body, None, (q, starts, bias_h))[1]

  @jax.custom_vjp
  def attention(q, kv_map, rel_h, rel_w, starts, bias_h, bias_w):
    return forward(q, kv_map, rel_h, rel_w, starts, bias_h, bias_w)[0]

  def attention_fwd(q, kv_map, rel_h, rel_w, starts, bias_h, bias_w):
    out, lse = forward(q, kv_map, rel_h, rel_w, starts, bias_h, bias_w)
    return out, (q, kv_map, rel_h, rel_w, starts, bias_h, bias_w, out, lse)

  def attention_bwd(residuals, d_out):
    q, kv_map, rel_h, rel_w, starts, bias_h, bias_w, out, lse = residuals

    def body(d_map, xs):
      q_row, start, bias, out_row, lse_row, d_out_row = xs
      d_q, d_strip, d_h, d_w = row_backward(
        q_row, strip_at(kv_map, start), rel_h, rel_w, bias, bias_w, out_row, lse_row, d_out_row
      )
      # Neighbouring rows' strips overlap: add into the map gradient in place.
      d_map = jax.lax.dynamic_update_slice_in_dim(
        d_map, strip_at(d_map, start) + d_strip, start, axis=0
      )
      return d_map, (d_q, d_h, d_w)

    d_map, (d_q, d_rel_h, d_rel_w) = jax.lax.scan(
      body, jnp.zeros_like(kv_map), (q, starts, bias_h, out, lse, d_out)
    )
    # Table gradients per row, summed here (a loop carry would not be sharded like the rows).
    return (
      d_q,
      d_map,
      d_rel_h.sum(0).astype(rel_h.dtype),
      d_rel_w.sum(0).astype(rel_w.dtype),
      None,
      jnp.zeros_like(bias_h),
      jnp.zeros_like(bias_w),
    )

  attention.defvjp(attention_fwd, attention_bwd)
  return attention
