"""The bodies of the fused halo-attention kernels (halonet/attention_pallas.py calls them).

One grid step is one (image, row of query blocks); the kernels walk the row's blocks. What runs
on the TensorCore, and why it is laid out so (the static schedules, bench/pallas.py):

  * A block's keys and values are a window of the step's strip of map rows, b+2h columns widened
    to a multiple of ALIGN (the extra columns are masked): the row granularity at which Mosaic
    slices and flattens it to [keys, channels] cheaply. Without it the relayout alone doubled
    the kernel's schedule. Blocks go in groups whose first window starts at a multiple of ALIGN
    columns, as Mosaic needs of a dynamic offset; the others sit at static offsets from it.
  * Heads stay side by side in the channels (the maps' own layout). The queries of all heads
    are stacked along the matmul's M dimension, each head's rows masked to its own channels, so
    every matmul with a window or constant loads it into the MXU once for all heads (the MXU
    does heads x the minimal FLOPs; it has room to spare, the VPU does not).
  * Logits live only in VMEM, float32, with the softmax over the whole window at once; the
    backward pass recomputes them (and the softmax) rather than storing anything per query.
  * Relative position logits come from the two factorized tables: one matmul of q with both
    tables (every row and column of the block), a constant 0/1 mask keeps each query's own row
    and column, and a constant 0/1 matmul spreads them over the window's keys, exactly
    (bfloat16 parts of the float32 terms stacked along M). Masks are resident additive tiles.
  * The backward pass adds each block's key/value gradient into a float32 strip in VMEM; the
    strip slides down one block row per grid step and writes the b map rows no later step
    touches, so the map gradients too are written once.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
# Mosaic takes a dynamic offset along the second-minor (sublane) dimension only if it can prove
# it is a multiple of this; windows and blocks of queries are rounded up to it too.
ALIGN = 8


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class KernelShape:
  """Static sizes of one call: the grid is (images, block rows); a step attends one block row."""
  images: int
  nbh: int  # Rows of query blocks.
  nbw: int  # Query blocks per row.
  queries: int  # Per block: (b / stride)^2, rounded up to ALIGN.
  heads: int
  qk_lanes: int  # heads * dk: the lanes of q and k.
  v_lanes: int  # heads * dv.
  block: int  # b.
  rows: int  # b + 2h: the map rows of a window.
  columns: int  # b + 2h rounded up to ALIGN: the map columns of a window.
  table_rows: int  # Of the stacked position tables.

  @classmethod
  def of(cls, block: int, heads: int, q: Any, k: Any, v: Any, tables: Any) -> 'KernelShape':
    images, nbh, nbw, queries, qk_lanes = q.shape
    rows = k.shape[1] - (nbh - 1) * block
    return cls(images, nbh, nbw, queries, heads, qk_lanes, v.shape[-1], block, rows,
               round_up(rows, ALIGN), tables.shape[0])

  @property
  def keys(self) -> int:
    return self.rows * self.columns

  def head_lanes(self, lanes: int, head: int) -> jax.Array:
    """[1, lanes] bool: the lanes of `head` (lanes = heads * d)."""
    per_head = lanes // self.heads
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, lanes), 1)
    return (lane >= head * per_head) & (lane < (head + 1) * per_head)


@dataclasses.dataclass(frozen=True)
class _Columns:
  """Where block column c's window lies in the map: from an ALIGN-multiple `base`, `width`
  columns are read, of which the window's start at static `offset`."""
  c: Any
  base: Any
  offset: int
  width: int


def _columns_of(shape: KernelShape, c: Any, aligned_base: Any, offset: int) -> _Columns:
  return _Columns(c, aligned_base, offset, shape.columns + (ALIGN if offset else 0))


def map_columns(nbw: int, block: int, columns: int) -> int:
  """Columns the kernels' key/value maps need so that every window's aligned read fits."""
  return max(c * block - c * block % ALIGN + columns + (ALIGN if c * block % ALIGN else 0)
             for c in range(nbw))


def for_each_block(shape: KernelShape, body: Callable[[_Columns, Any], Any], carry: Any) -> Any:
  """carry = body(_Columns of c, carry) for each block column c of the row, in order.

  Blocks go in groups of `period` (period * b is a multiple of ALIGN): a group's first window
  starts at a provably aligned dynamic column, and the others at static offsets from it.
  """
  period = ALIGN // np.gcd(shape.block, ALIGN)
  groups, tail = divmod(shape.nbw, period)

  def group(g, carry):
    for j in range(period):
      start = j * shape.block
      base = pl.multiple_of(g * period * shape.block + start - start % ALIGN, ALIGN)
      carry = body(_columns_of(shape, g * period + j, base, start % ALIGN), carry)
    return carry

  if groups:
    carry = jax.lax.fori_loop(0, groups, group, carry)
  for c in range(groups * period, shape.nbw):  # The last, partial group: all static.
    start = c * shape.block
    carry = body(_columns_of(shape, c, start - start % ALIGN, start % ALIGN), carry)
  return carry


def _window(ref, shape, at: _Columns):
  """[keys, lanes] keys (or values) of a block's window, from the step's strip of map rows."""
  strip = ref[0, :, pl.ds(at.base, at.width), :][:, at.offset:at.offset + shape.columns]
  return strip.reshape(shape.keys, strip.shape[-1])


def _add_window(strip_ref, shape, at: _Columns, update):
  """Adds [keys, lanes] `update` into the f32 strip at a block's window (aligned read-write)."""
  update = update.reshape(shape.rows, shape.columns, -1)
  if at.width != shape.columns:
    update = jnp.pad(update, ((0, 0), (at.offset, at.width - at.offset - shape.columns), (0, 0)))
  strip_ref[:, pl.ds(at.base, at.width), :] += update


def _stack_heads(x, shape):
  """[queries, heads * d] -> [heads * queries, heads * d]: head n's rows keep only its lanes, so
  one matmul with a window serves every head (the MXU loads the window once)."""
  return jnp.concatenate([jnp.where(shape.head_lanes(x.shape[1], n), x, jnp.zeros_like(x))
                          for n in range(shape.heads)])


def _merge_heads(stacked, shape):
  """Inverse of `_stack_heads`: [heads * queries, heads * d] -> [queries, heads * d]."""
  q, lanes = shape.queries, stacked.shape[1]
  return sum(jnp.where(shape.head_lanes(lanes, n), stacked[n * q:(n + 1) * q], 0.0)
             for n in range(shape.heads))


def _per_head(x, y, shape, op):
  """op(x, y) with y [queries, n] broadcast over x's heads ([heads * queries, n])."""
  return op(x.reshape(shape.heads, shape.queries, -1), y[None]).reshape(x.shape)


def _spread_matmul(x, ones, dims, compute_dtype):
  """float32 x times a 0/1 matrix in one bfloat16 matmul: x's bfloat16 parts are stacked along
  M, so the MXU loads `ones` once (HIGHEST precision would load it 6 times). Three parts are
  exact in float32; for bfloat16 compute two (16 bits, 2^7 finer than the bfloat16 weights
  the softmax output is cast to)."""
  parts, rest = [], x
  for _ in range(2 if compute_dtype == jnp.bfloat16 else 3):
    parts.append(rest.astype(jnp.bfloat16))
    rest = rest - parts[-1].astype(F32)
  product = jax.lax.dot_general(jnp.concatenate(parts), ones, dims, preferred_element_type=F32)
  m = x.shape[0]
  return sum(product[i * m:(i + 1) * m] for i in range(len(parts)))


def _logits(q_stack, keys, tables, own, spread, bias, shape):
  """[heads * queries, keys] float32 logits over one window: content, then the relative
  position terms of each query's own row and column spread over the keys, then the masks."""
  content = jax.lax.dot_general(q_stack, keys, NT, preferred_element_type=F32)
  products = jax.lax.dot_general(q_stack, tables, NT, preferred_element_type=F32)
  products = _per_head(products, own, shape, jnp.multiply)
  position = _spread_matmul(products, spread, NN, q_stack.dtype)
  return _per_head(content + position, bias, shape, jnp.add)


def _weights(logits):
  """Softmax over the window's keys, float32. The whole window is in VMEM at once, so the
  backward pass recomputes it like this too, instead of storing a log-sum-exp."""
  weights = jnp.exp(logits - logits.max(axis=1, keepdims=True))
  return weights / weights.sum(axis=1, keepdims=True)


def forward_kernel(shape: KernelShape, q_ref, k_ref, v_ref, tables_ref, own_ref, spread_ref,
                   bias_rows_ref, bias_cols_ref, out_ref):
  tables, own, spread = tables_ref[...], own_ref[...], spread_ref[...]
  bias_row = bias_rows_ref[pl.program_id(1)]

  def block(at, carry):
    keys, values = _window(k_ref, shape, at), _window(v_ref, shape, at)
    weights = _weights(_logits(_stack_heads(q_ref[at.c], shape), keys, tables, own, spread,
                               bias_row + bias_cols_ref[at.c], shape))
    out = jnp.dot(weights.astype(values.dtype), values, preferred_element_type=F32)
    out_ref[at.c] = _merge_heads(out, shape).astype(out_ref.dtype)
    return carry

  for_each_block(shape, block, 0)


def backward_kernel(shape: KernelShape, q_ref, k_ref, v_ref, tables_ref, own_ref, spread_ref,
                    bias_rows_ref, bias_cols_ref, out_ref, d_out_ref, d_q_ref, d_k_ref, d_v_ref,
                    d_tables_ref, d_k_strip, d_v_strip):
  r = pl.program_id(1)

  @pl.when(r == 0)
  def _():  # An image's first step: its strips and table gradient start at zero.
    for ref in (d_k_strip, d_v_strip, d_tables_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  @pl.when(r < shape.nbh)
  def _():
    tables, own, spread = tables_ref[...], own_ref[...], spread_ref[...]
    bias_row = bias_rows_ref[r]

    def block(at, d_tables):
      c = at.c
      keys, values = _window(k_ref, shape, at), _window(v_ref, shape, at)
      q_stack = _stack_heads(q_ref[c], shape)
      d_out_stack = _stack_heads(d_out_ref[c], shape)
      weights = _weights(_logits(q_stack, keys, tables, own, spread, bias_row + bias_cols_ref[c],
                                 shape))
      d_weights = jax.lax.dot_general(d_out_stack, values, NT, preferred_element_type=F32)
      delta = _per_head(d_out_stack.astype(F32), out_ref[c].astype(F32), shape, jnp.multiply)
      d_logits = weights * (d_weights - delta.sum(axis=1, keepdims=True))
      d_products = _per_head(_spread_matmul(d_logits, spread, NT, q_stack.dtype), own, shape,
                             jnp.multiply)
      d_logits, d_products = d_logits.astype(q_stack.dtype), d_products.astype(q_stack.dtype)
      d_q = (jnp.dot(d_logits, keys, preferred_element_type=F32)
             + jnp.dot(d_products, tables, preferred_element_type=F32))
      d_q_ref[c] = _merge_heads(d_q, shape).astype(d_q_ref.dtype)
      d_keys = jax.lax.dot_general(d_logits, q_stack, TN, preferred_element_type=F32)
      d_values = jax.lax.dot_general(weights.astype(d_out_stack.dtype), d_out_stack, TN,
                                     preferred_element_type=F32)
      _add_window(d_k_strip, shape, at, d_keys)
      _add_window(d_v_strip, shape, at, d_values)
      return d_tables + jax.lax.dot_general(d_products, q_stack, TN, preferred_element_type=F32)

    d_tables_ref[...] += for_each_block(shape, block, jnp.zeros(d_tables_ref.shape, F32))

  # Map rows [r*b, (r+1)*b) get nothing from later rows of blocks: write them, slide the strip.
  b, rest = shape.block, shape.rows - shape.block
  for strip, d_ref in ((d_k_strip, d_k_ref), (d_v_strip, d_v_ref)):
    d_ref[...] = strip[:b].astype(d_ref.dtype)
    if rest:
      strip[:rest] = strip[b:]
    strip[rest:] = jnp.zeros((b,) + strip.shape[1:], strip.dtype)


def kernel_flops(shape: KernelShape, backward: bool) -> dict[str, int]:
  """FLOPs of the matmuls as the kernel issues them (2 M N K each; every head contracts all
  heads' lanes of its masked q) and exponentials, for one direction."""
  q, keys, qk, v = shape.queries, shape.keys, shape.qk_lanes, shape.v_lanes
  table_rows = shape.table_rows
  logits = keys * qk + table_rows * qk + table_rows * keys
  if backward:  # Recomputed logits; d_weights, d_products; d_q (two); d_keys, d_values, d_tables.
    per_query = logits + keys * v + keys * table_rows + keys * qk + table_rows * qk + keys * qk \
        + keys * v + table_rows * qk
  else:  # Logits, weights @ values.
    per_query = logits + keys * v
  heads_queries = shape.images * shape.nbh * shape.nbw * shape.heads * q
  return {'flops': 2 * heads_queries * per_query, 'transcendentals': heads_queries * keys}
