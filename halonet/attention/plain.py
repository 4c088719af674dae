"""The plain form of halo attention: pad, cut neighbourhoods, two einsums, float32 softmax.

Readable alone and the reference for the other forms. Every step keeps the batch axis in front,
so under a data-sharded batch each device attends only over its own images, and there is no
loop; autodiff gives the backward pass. Letters in the einsums: see common.py's legend.
"""

from typing import Any

import jax
import jax.numpy as jnp

from halonet.rounding import ceil_div


def plain_attention(
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
  with_weights: bool = False,
) -> Any:
  """Each query block's softmax attention over its neighbourhood, all blocks at once.

  Every implementation (common.Attend) takes these arguments and returns this result.

  Args:
    q: [batch, nbh*qy, nbw*qx, heads*dk] queries, padded to nbh x nbw blocks of qy x qx.
    k, v: [batch, nbh*b + 2h, nbw*b + 2h, heads*dk (k) or heads*dv (v)] keys and values, padded
      by h. Heads sit side by side in the channels (see HeadProjection).
    rel_h, rel_w: [qy, b+2h, dk] and [qx, b+2h, dk] position embedding of each (query row, key
      row) and (query column, key column) pair of a block.
    bias_h, bias_w: [nbh, qy or 1, b+2h] and [nbw, qx or 1, b+2h] additive masks (0 or
      common.MASKED_LOGIT) per block row / column.
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
    batch, nbh, window, nbw, window, heads, -1
  )
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
  out = jnp.einsum('bijnyxuv,biujvnd->biyjxnd', weights, v, preferred_element_type=f32).astype(
    q.dtype
  )
  out = out.reshape(batch, nbh * qy, nbw * qx, -1)
  return (out, probabilities) if with_weights else out


def neighbourhoods(x: jax.Array, axis: int, block: int, halo: int, num_blocks: int) -> jax.Array:
  """Splits `axis` (padded by `halo` in front) into num_blocks overlapping (block+2*halo) windows.

  The axis becomes two, (num_blocks, block + 2 * halo). Window j starts at j * block: it is the
  concatenation of block-aligned slices shifted by 0, block, 2*block, ... (ceil((b+2h)/b) of
  them, usually 2), so it costs a few static slices whatever the map size.
  """
  window = block + 2 * halo
  shifts = ceil_div(window, block)
  needed = (num_blocks + shifts - 1) * block
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, max(needed - x.shape[axis], 0))
  x = jnp.pad(x, pad)
  blocked = []
  for t in range(shifts):
    part = jax.lax.slice_in_dim(x, t * block, t * block + num_blocks * block, axis=axis)
    blocked.append(part.reshape(x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1 :]))
  windows = jnp.concatenate(blocked, axis=axis + 1)
  return jax.lax.slice_in_dim(windows, 0, window, axis=axis + 1)
