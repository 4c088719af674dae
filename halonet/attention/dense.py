"""Halo attention through `jax.nn.dot_product_attention`: a candidate for 'auto' on GPU.

Every query block and its neighbourhood become one attention problem of qy*qx queries and
(b+2h)^2 keys, all blocks of all images side by side in the batch axis. The position terms
q.r_row + q.r_col depend on the query, so they (with the masks) are computed first, as the
additive bias of each (query, key) pair; the rest, softmax included, is JAX's fused attention,
which on an NVIDIA GPU may run as a cuDNN kernel (JAX picks the implementation) and elsewhere as
XLA's own composition. q arrives scaled, so the call's scale is 1. Heads whose value width
differs from the key width are zero-padded to the larger (the call wants one head width), which
changes no logit and no output channel that is kept.

Same inputs and result as `plain.plain_attention` (common.Attend); einsum letters: common.py.
"""

import jax
import jax.numpy as jnp

from halonet.attention import plain


def dense_attention(
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
  """`plain.plain_attention` (same arguments and result) as one fused attention call."""
  b, h, heads = block_size, halo_size, num_heads
  (qy, window, dk), qx = rel_h.shape, rel_w.shape[0]
  batch, nbh, nbw = q.shape[0], q.shape[1] // qy, q.shape[2] // qx
  dv = v.shape[-1] // heads
  q = q.reshape(batch, nbh, qy, nbw, qx, heads, dk)
  f32 = jnp.float32
  row = jnp.einsum('biyjxnd,yud->bijnyxu', q, rel_h, preferred_element_type=f32)
  col = jnp.einsum('biyjxnd,xvd->bijnyxv', q, rel_w, preferred_element_type=f32)
  row = row + bias_h[None, :, None, None, :, None, :]
  col = col + bias_w[None, None, :, None, None, :, :]
  blocks = batch * nbh * nbw
  bias = (row[..., :, None] + col[..., None, :]).reshape(blocks, heads, qy * qx, window * window)

  def per_block(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """[batch, nbh, rows, nbw, cols, heads, d] -> [blocks, rows * cols, heads, d]."""
    x = x.transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(blocks, rows * cols, heads, x.shape[-1])

  windows = lambda x: plain.neighbourhoods(plain.neighbourhoods(x, 1, b, h, nbh), 3, b, h, nbw)
  k = windows(k).reshape(batch, nbh, window, nbw, window, heads, dk)
  v = windows(v).reshape(batch, nbh, window, nbw, window, heads, dv)
  width = max(dk, dv)
  widen = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
  out = jax.nn.dot_product_attention(
    widen(per_block(q, qy, qx)),
    widen(per_block(k, window, window)),
    widen(per_block(v, window, window)),
    bias=bias.astype(q.dtype),
    scale=1.0,
  )[..., :dv]
  out = out.reshape(batch, nbh, nbw, qy, qx, heads * dv).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(batch, nbh * qy, nbw * qx, heads * dv)
