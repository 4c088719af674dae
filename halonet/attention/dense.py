"""Halo attention through `jax.nn.dot_product_attention`: a candidate for 'auto' on GPU.

Every query block and its neighbourhood become one attention problem of qy*qx queries and
(b+2h)^2 keys, all blocks of all images side by side in the batch axis. The position terms and
masks are folded into the dot product itself, so no logits-sized bias is built: each query
carries its row terms q.r_row + bias_row (one per key row of the window) and its column terms
(one per key column) after its channels, and each key a one-hot of its row and of its column
after its own, so q'.k' = q.k + row term + column term. The softmax and the rest are JAX's
fused attention, which on an NVIDIA GPU may run as a cuDNN kernel (JAX picks the implementation)
and elsewhere as XLA's own composition. q arrives scaled, so the call's scale is 1. The widened
queries and keys and the values are zero-padded to one width (the call wants one head width),
which changes no logit and no output channel that is kept.

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
  # [batch, nbh, qy, nbw, qx, heads, window]: each query's row and column terms, masks added.
  row = jnp.einsum('biyjxnd,yud->biyjxnu', q, rel_h, preferred_element_type=f32)
  col = jnp.einsum('biyjxnd,xvd->biyjxnv', q, rel_w, preferred_element_type=f32)
  row = row + bias_h[None, :, :, None, None, None, :]
  col = col + bias_w[None, None, None, :, :, None, :]
  blocks = batch * nbh * nbw

  def per_block(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """[batch, nbh, rows, nbw, cols, heads, d] -> [blocks, rows * cols, heads, d]."""
    x = x.transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(blocks, rows * cols, heads, x.shape[-1])

  terms = jnp.concatenate([row, col], axis=-1).astype(q.dtype)
  queries = per_block(jnp.concatenate([q, terms], axis=-1), qy, qx)
  windows = lambda x: plain.neighbourhoods(plain.neighbourhoods(x, 1, b, h, nbh), 3, b, h, nbw)
  k = per_block(windows(k).reshape(batch, nbh, window, nbw, window, heads, dk), window, window)
  v = per_block(windows(v).reshape(batch, nbh, window, nbw, window, heads, dv), window, window)
  # Key (u, v) of a window: one-hots of u and of v, the same for every block and head.
  one_hot = jnp.eye(window, dtype=q.dtype)
  places = jnp.concatenate(
    [jnp.repeat(one_hot, window, axis=0), jnp.tile(one_hot, (window, 1))], axis=-1
  )
  places = jnp.broadcast_to(places[None, :, None], (blocks, window * window, heads, 2 * window))
  keys = jnp.concatenate([k, places], axis=-1)
  width = max(dk + 2 * window, dv)
  widen = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
  out = jax.nn.dot_product_attention(widen(queries), widen(keys), widen(v), scale=1.0)[..., :dv]
  out = out.reshape(batch, nbh, nbw, qy, qx, heads * dv).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(batch, nbh * qy, nbw * qx, heads * dv)
