"""The bodies of the fused halo-attention kernels (pallas.py calls them).

One grid step is one (image, row of query blocks); the kernels walk the row's blocks. What runs
on the TensorCore, and why it is laid out so (the static schedules, bench/pallas.py):

  * A block's keys and values are a window of the step's strip of map rows, b+2h columns widened
    to a multiple of ALIGN (the extra columns are masked): the row granularity at which Mosaic
    slices and flattens it to [keys, channels] cheaply. Without it the relayout alone doubled
    the kernel's schedule. Blocks go in groups whose first window starts at a multiple of ALIGN
    columns, as Mosaic needs of a dynamic offset; the others sit at static offsets from it.
  * Heads stay side by side in the channels (the maps' own layout), in groups that fill whole
    128-lane tiles (`KernelShape.head_groups`). A group's queries are stacked along the
    matmul's M dimension, each head's rows masked to its own channels, so every matmul with a
    window or constant loads the group's lanes into the MXU once for all its heads (the MXU
    does the group's size times the minimal FLOPs; narrow heads leave it room to spare, the
    VPU has none). In the deep stages, where heads are 32-128 lanes wide, the groups cut the
    kernels' static schedules by a fifth to a half against stacking all heads at once.
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

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from halonet.rounding import ceil_div

F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
# Mosaic takes a dynamic offset along the second-minor (sublane) dimension only if it can prove
# it is a multiple of this; windows and blocks of queries are rounded up to it too.
ALIGN = 8
LANES = 128  # Of a TPU vector register and memory tile; the MXU's contraction width (v5e).


def round_up(n: int, multiple: int) -> int:
  return ceil_div(n, multiple) * multiple


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
    return cls(
      images,
      nbh,
      nbw,
      queries,
      heads,
      qk_lanes,
      v.shape[-1],
      block,
      rows,
      round_up(rows, ALIGN),
      tables.shape[0],
    )

  @property
  def keys(self) -> int:
    return self.rows * self.columns

  def head_groups(self, lanes: int) -> list['HeadGroup']:
    """The heads of `lanes` (= heads * d) in groups whose lanes fill whole 128-lane tiles.

    A group's queries are stacked along M, each head's rows masked to its own lanes, so one
    matmul with a window serves the group (the MXU loads the window once per group). Groups
    the size of a lane tile keep that matmul's contraction (and the masking) to the group's own
    tile: with d = 32 the MXU does 4x the minimal work rather than heads x, with d = 128 none.
    """
    d = lanes // self.heads
    if d % LANES == 0:
      size = 1
    elif LANES % d == 0 and lanes % LANES == 0:
      size = LANES // d
    else:  # Narrower than a tile (H1 stage 1: 4 x 16 lanes), or heads straddle tiles.
      size = self.heads
    return [HeadGroup(first, size, first * d, size * d) for first in range(0, self.heads, size)]


@dataclasses.dataclass(frozen=True)
class HeadGroup:
  """Heads [first, first + count), which own lanes [lane, lane + width) of a map."""

  first: int
  count: int
  lane: int
  width: int

  @property
  def lanes(self) -> slice:
    return slice(self.lane, self.lane + self.width)

  def rows(self, queries: int) -> slice:
    """The group's rows of a [heads * queries, ...] stack."""
    return slice(self.first * queries, (self.first + self.count) * queries)

  def own_lanes(self, head: int) -> jax.Array:
    """[1, width] bool: the lanes of the group's `head`-th head, within the group's lanes."""
    per_head = self.width // self.count
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, self.width), 1)
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
  return max(
    c * block - c * block % ALIGN + columns + (ALIGN if c * block % ALIGN else 0)
    for c in range(nbw)
  )


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
  strip = ref[0, :, pl.ds(at.base, at.width), :][:, at.offset : at.offset + shape.columns]
  return strip.reshape(shape.keys, strip.shape[-1])


def _add_window(strip_ref, shape, at: _Columns, update):
  """Adds [keys, lanes] `update` into the f32 strip at a block's window (aligned read-write)."""
  update = update.reshape(shape.rows, shape.columns, -1)
  if at.width != shape.columns:
    update = jnp.pad(update, ((0, 0), (at.offset, at.width - at.offset - shape.columns), (0, 0)))
  strip_ref[:, pl.ds(at.base, at.width), :] += update


def _stack_heads(x, group: HeadGroup):
  """[queries, heads * d] -> [count * queries, width]: the group's lanes, each of its heads'
  rows keeping only that head's lanes."""
  x = x[:, group.lanes]
  if group.count == 1:
    return x
  return jnp.concatenate(
    [jnp.where(group.own_lanes(n), x, jnp.zeros_like(x)) for n in range(group.count)]
  )


def _merge_heads(stacked, group: HeadGroup, queries: int):
  """Inverse of `_stack_heads`: [count * queries, width] -> [queries, width]."""
  if group.count == 1:
    return stacked
  return sum(
    jnp.where(group.own_lanes(n), stacked[n * queries : (n + 1) * queries], 0.0)
    for n in range(group.count)
  )


def _per_head(x, y, heads: int, op):
  """op(x, y) with y [queries, n] broadcast over x's `heads` stacked heads."""
  return op(x.reshape(heads, y.shape[0], -1), y[None]).reshape(x.shape)


def _by_group(parts, axis):
  """Per-group results side by side: along the stacked rows (axis 0) or the lanes (axis 1)."""
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


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
  return sum(product[i * m : (i + 1) * m] for i in range(len(parts)))


def _logits(q_stacks, groups, keys, tables, own, spread, bias, shape):
  """[heads * queries, keys] float32 logits over one window: content, then the relative
  position terms of each query's own row and column spread over the keys, then the masks."""
  content = _by_group(
    [
      jax.lax.dot_general(stack, keys[:, g.lanes], NT, preferred_element_type=F32)
      for g, stack in zip(groups, q_stacks)
    ],
    axis=0,
  )
  products = _by_group(
    [
      jax.lax.dot_general(stack, tables[:, g.lanes], NT, preferred_element_type=F32)
      for g, stack in zip(groups, q_stacks)
    ],
    axis=0,
  )
  products = _per_head(products, own, shape.heads, jnp.multiply)
  position = _spread_matmul(products, spread, NN, q_stacks[0].dtype)
  return _per_head(content + position, bias, shape.heads, jnp.add)


def _weights(logits):
  """Softmax over the window's keys, float32. The whole window is in VMEM at once, so the
  backward pass recomputes it like this too, instead of storing a log-sum-exp."""
  weights = jnp.exp(logits - logits.max(axis=1, keepdims=True))
  return weights / weights.sum(axis=1, keepdims=True)


def forward_kernel(
  shape: KernelShape,
  q_ref,
  k_ref,
  v_ref,
  tables_ref,
  own_ref,
  spread_ref,
  bias_rows_ref,
  bias_cols_ref,
  out_ref,
):
  tables, own, spread = tables_ref[...], own_ref[...], spread_ref[...]
  bias_row = bias_rows_ref[pl.program_id(1)]
  qk_groups, v_groups = shape.head_groups(shape.qk_lanes), shape.head_groups(shape.v_lanes)
  n = shape.queries

  def block(at, carry):
    keys, values = _window(k_ref, shape, at), _window(v_ref, shape, at)
    q = q_ref[at.c]
    weights = _weights(
      _logits(
        [_stack_heads(q, g) for g in qk_groups],
        qk_groups,
        keys,
        tables,
        own,
        spread,
        bias_row + bias_cols_ref[at.c],
        shape,
      )
    )
    out = _by_group(
      [
        _merge_heads(
          jnp.dot(
            weights[g.rows(n)].astype(values.dtype), values[:, g.lanes], preferred_element_type=F32
          ),
          g,
          n,
        )
        for g in v_groups
      ],
      axis=1,
    )
    out_ref[at.c] = out.astype(out_ref.dtype)
    return carry

  for_each_block(shape, block, 0)


def backward_kernel(
  shape: KernelShape,
  q_ref,
  k_ref,
  v_ref,
  tables_ref,
  own_ref,
  spread_ref,
  bias_rows_ref,
  bias_cols_ref,
  out_ref,
  d_out_ref,
  d_q_ref,
  d_k_ref,
  d_v_ref,
  d_tables_ref,
  d_k_strip,
  d_v_strip,
):
  r = pl.program_id(1)
  qk_groups, v_groups = shape.head_groups(shape.qk_lanes), shape.head_groups(shape.v_lanes)
  n = shape.queries

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
      q, d_out, out = q_ref[c], d_out_ref[c], out_ref[c].astype(F32)
      q_stacks = [_stack_heads(q, g) for g in qk_groups]
      d_out_stacks = [_stack_heads(d_out, g) for g in v_groups]
      dtype = q.dtype
      weights = _weights(
        _logits(q_stacks, qk_groups, keys, tables, own, spread, bias_row + bias_cols_ref[c], shape)
      )
      d_weights = _by_group(
        [
          jax.lax.dot_general(d_o, values[:, g.lanes], NT, preferred_element_type=F32)
          for g, d_o in zip(v_groups, d_out_stacks)
        ],
        axis=0,
      )
      delta = _by_group(
        [
          _per_head(d_o.astype(F32), out[:, g.lanes], g.count, jnp.multiply).sum(
            axis=1, keepdims=True
          )
          for g, d_o in zip(v_groups, d_out_stacks)
        ],
        axis=0,
      )
      d_logits = weights * (d_weights - delta)
      d_products = _per_head(
        _spread_matmul(d_logits, spread, NT, dtype), own, shape.heads, jnp.multiply
      )
      # Each group's rows, cast to the compute dtype (sliced first: whole float32 row tiles).
      d_logits_of = lambda g: d_logits[g.rows(n)].astype(dtype)
      d_products_of = lambda g: d_products[g.rows(n)].astype(dtype)
      d_q = _by_group(
        [
          _merge_heads(
            jnp.dot(d_logits_of(g), keys[:, g.lanes], preferred_element_type=F32)
            + jnp.dot(d_products_of(g), tables[:, g.lanes], preferred_element_type=F32),
            g,
            n,
          )
          for g in qk_groups
        ],
        axis=1,
      )
      d_q_ref[c] = d_q.astype(d_q_ref.dtype)
      d_keys = _by_group(
        [
          jax.lax.dot_general(d_logits_of(g), stack, TN, preferred_element_type=F32)
          for g, stack in zip(qk_groups, q_stacks)
        ],
        axis=1,
      )
      d_values = _by_group(
        [
          jax.lax.dot_general(weights[g.rows(n)].astype(dtype), d_o, TN, preferred_element_type=F32)
          for g, d_o in zip(v_groups, d_out_stacks)
        ],
        axis=1,
      )
      _add_window(d_k_strip, shape, at, d_keys)
      _add_window(d_v_strip, shape, at, d_values)
      return d_tables + _by_group(
        [
          jax.lax.dot_general(d_products_of(g), stack, TN, preferred_element_type=F32)
          for g, stack in zip(qk_groups, q_stacks)
        ],
        axis=1,
      )

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
  lanes of its head group, `KernelShape.head_groups`) and exponentials, for one direction."""
  q, keys = shape.queries, shape.keys
  qk, v = (shape.head_groups(lanes)[0].width for lanes in (shape.qk_lanes, shape.v_lanes))
  table_rows = shape.table_rows
  logits = keys * qk + table_rows * qk + table_rows * keys
  if backward:  # Recomputed logits; d_weights, d_products; d_q (two); d_keys, d_values, d_tables.
    per_query = (
      logits
      + keys * v
      + keys * table_rows
      + keys * qk
      + table_rows * qk
      + keys * qk
      + keys * v
      + table_rows * qk
    )
  else:  # Logits, weights @ values.
    per_query = logits + keys * v
  heads_queries = shape.images * shape.nbh * shape.nbw * shape.heads * q
  return {'flops': 2 * heads_queries * per_query, 'transcendentals': heads_queries * keys}
