"""Halo attention as two fused Pallas TPU kernels (forward, backward), FlashAttention style.

Same inputs and result as `attention.plain_attention`; `attention_impl='pallas'`. The plain form
writes every block's (b+2h)^2 logits and its overlapping key/value windows to HBM and reads them
back: under 1 FLOP per byte for H1 on TPU, memory-bound. Here one grid step is one (image, row of
query blocks), and only inputs and outputs touch HBM (bench/pallas.py: ~35x the plain form's
arithmetic intensity):

  * Keys and values are read straight from the padded maps: a step's block is the b+2h map rows
    its blocks' neighbourhoods span (`pl.Element` rows, overlapping between steps), so windows
    are never materialised. A window is a slice of that strip, b+2h columns widened to a
    multiple of 8 (the extra columns are masked), the row granularity at which Mosaic slices
    and flattens it to [keys, channels] cheaply: without it the relayout alone doubled the
    kernel's schedule. Blocks go in groups whose first window starts at a multiple of 8
    columns, as Mosaic needs of a dynamic offset; the others sit at static offsets from it.
  * Heads stay side by side in the channels (the maps' own layout). The queries of all heads
    are stacked along the matmul's M dimension, each head's rows masked to its own channels, so
    every matmul with a window or constant loads it into the MXU once for all heads (the MXU
    does heads x the minimal FLOPs; it has room to spare, the VPU does not).
  * Logits live only in VMEM, float32, with the softmax over the whole window at once; the
    backward pass recomputes them (and the softmax) rather than storing anything per query.
  * Relative position logits are computed in the kernel from the two factorized tables: one
    matmul of q with both tables (every row and column of the block), a constant 0/1 mask keeps
    each query's own row and column, and a constant 0/1 matmul spreads them over the window's
    keys, exactly (bfloat16 parts of the float32 terms stacked along M). Padding and
    `mask_window` masks are resident additive tiles.
  * The backward pass adds each block's key/value gradient into a float32 strip in VMEM; the
    strip slides down one block row per grid step and writes the b map rows no later step
    touches, so the map gradients too are written once (rows run in order; images in parallel).

The alternative the issue proposed first (fold the position terms and mask into the dot product
and call `jax.nn.dot_product_attention`) still materialises the overlapping windows, because
dense attention takes one key set per query block: it removes the logits' traffic but not the
windows'. Pallas' splash attention needs 128-multiple blocks and has no 2-D halo mask.

On CPU the kernels run in Pallas interpret mode (the tests); on TPU Mosaic compiles them (checked
without a TPU by compiling through libtpu: tests/test_pallas.py). On GPU the Mosaic kernels
cannot run (Triton would need power-of-two blocks and atomics for the overlapping gradients), so
`attention_impl='pallas'` there is refused in one line.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from halonet import errors
from halonet import sharding

BACKENDS = ('tpu', 'cpu')  # Where the kernels run: compiled by Mosaic, or interpreted.
F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
# Scoped VMEM the kernels may use: above the 16/32 MiB defaults (H7's 600 px stage-1 backward
# needs ~20 MiB), below the 64 MiB of the smallest current TPU core.
VMEM_LIMIT_BYTES = 48 * 2**20
# How the kernels run on CPU: Pallas' generic interpreter (tests swap in its TPU interpreter,
# pltpu.InterpretParams, to look for races; its callbacks cannot sit beside a TPU lowering).
INTERPRET = True
# Logit of the columns a window is widened by: attention.MASKED_LOGIT's value (finite, so a
# fully masked row of padding queries gives no NaN); attention.py imports this module.
WIDENED_COLUMN_LOGIT = -1e30


def check_backend(backend: str) -> None:
  """Raises one line if the kernels cannot run on `backend`."""
  if backend not in BACKENDS:
    raise errors.ConfigError(f"attention_impl='pallas' runs on TPU (and interpreted on CPU), not "
                             f"on {backend}; use attention_impl='plain' (or 'auto')")


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_h: jax.Array,
                     rel_w: jax.Array, bias_h: jax.Array, bias_w: jax.Array, *, block_size: int,
                     halo_size: int, num_heads: int) -> jax.Array:
  """`attention.plain_attention` (same arguments) as one kernel per direction, per device."""
  attend = functools.partial(_attention, block=block_size, halo=halo_size, heads=num_heads)
  return sharding.per_device_images(attend)(q, k, v, rel_h, rel_w, bias_h, bias_w)


def sublane_tile(dtype: Any) -> int:
  """Rows of one VMEM tile of `dtype` (8 x 32-bit, 16 x 16-bit): slices and reshapes of the
  second-minor dimension at multiples of it are free."""
  return 8 * 4 // jnp.dtype(dtype).itemsize


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _attention(q, k, v, rel_h, rel_w, bias_h, bias_w, *, block, halo, heads):
  """Rearranges the inputs into the kernels' layout and back."""
  (qy, window, _), qx = rel_h.shape, rel_w.shape[0]
  batch, nbh, nbw = q.shape[0], q.shape[1] // qy, q.shape[2] // qx
  columns, queries = _round_up(window, ALIGN), _round_up(qy * qx, ALIGN)
  # [batch, nbh, nbw, queries, heads * dk]: one block's queries row-major, padded with zero
  # queries to a multiple of 8 rows (their rows are dropped below).
  q_blocks = q.reshape(batch, nbh, qy, nbw, qx, -1).transpose(0, 1, 3, 2, 4, 5)
  q_blocks = q_blocks.reshape(batch, nbh, nbw, qy * qx, -1)
  q_blocks = jnp.pad(q_blocks, ((0, 0),) * 3 + ((0, queries - qy * qx), (0, 0)))
  # Keys and values widened so that the last block's window can be read (_for_each_block).
  widen = ((0, 0), (0, 0), (0, map_columns(nbw, block, columns) - k.shape[2]), (0, 0))
  tables = position_tables(rel_h, rel_w, bias_h, bias_w, heads, columns, queries)
  out = _fused(block, heads, q_blocks, jnp.pad(k, widen), jnp.pad(v, widen), *tables)
  out = out[:, :, :, :qy * qx].reshape(batch, nbh, nbw, qy, qx, -1).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(batch, nbh * qy, nbw * qx, -1)


def position_tables(rel_h: jax.Array, rel_w: jax.Array, bias_h: jax.Array, bias_w: jax.Array,
                    heads: int, columns: int, queries: int) -> tuple[jax.Array, ...]:
  """The kernels' position inputs for windows `columns` wide and blocks of `queries` (padded).

  Returns
    tables [rows, heads * dk]: both relative tables stacked, repeated in every head's lanes;
    own [queries, rows]: 1 where a table row belongs to the query's own row or column;
    spread [rows, keys]: 0/1, adds a query's row and column terms onto each key of the window;
    bias_rows [nbh, queries, keys], bias_cols [nbw, queries, keys]: the additive masks, the
      widened columns masked.
  """
  qy, window = rel_h.shape[:2]
  qx = rel_w.shape[0]
  q_row, q_col = np.divmod(np.arange(qy * qx), qx)
  key_row, key_col = np.divmod(np.arange(window * columns), columns)
  tables = jnp.tile(jnp.concatenate([rel_h.reshape(qy * window, -1),
                                     rel_w.reshape(qx * window, -1)]), (1, heads))
  # Table row t is (query row or column, key row or column) = divmod(t, window).
  table_query, table_key = np.divmod(np.arange((qy + qx) * window), window)
  is_row = np.arange((qy + qx) * window) < qy * window
  own = np.where(is_row, q_row[:, None] == table_query, q_col[:, None] == table_query - qy)
  spread = np.where(is_row[:, None], table_key[:, None] == key_row, table_key[:, None] == key_col)
  pad = ((0, 0), (0, queries - qy * qx), (0, 0))
  bias_rows = jnp.broadcast_to(bias_h, (bias_h.shape[0], qy, window))[:, q_row][..., key_row]
  bias_cols = jnp.broadcast_to(bias_w, (bias_w.shape[0], qx, window))[:, q_col]
  bias_cols = jnp.where(key_col < window, bias_cols[..., np.minimum(key_col, window - 1)],
                        WIDENED_COLUMN_LOGIT)
  return (tables, jnp.asarray(np.pad(own, pad[1:]), F32),
          jnp.asarray(spread, jnp.bfloat16),  # 0/1: exact in bfloat16.
          jnp.pad(bias_rows, pad).astype(F32), jnp.pad(bias_cols, pad).astype(F32))


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
               _round_up(rows, ALIGN), tables.shape[0])

  @property
  def keys(self) -> int:
    return self.rows * self.columns

  def head_lanes(self, lanes: int, head: int) -> jax.Array:
    """[1, lanes] bool: the lanes of `head` (lanes = heads * d)."""
    per_head = lanes // self.heads
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, lanes), 1)
    return (lane >= head * per_head) & (lane < (head + 1) * per_head)


# Mosaic takes a dynamic offset along the second-minor (sublane) dimension only if it can prove
# it is a multiple of this.
ALIGN = 8


@dataclasses.dataclass(frozen=True)
class _Columns:
  """Where block column c's window lies in the map: from an ALIGN-multiple `base`, `width`
  columns are read, of which the window's start at static `offset`."""
  c: Any
  base: Any
  offset: int
  width: int


def _columns_of(shape: 'KernelShape', c: Any, aligned_base: Any, offset: int) -> _Columns:
  return _Columns(c, aligned_base, offset, shape.columns + (ALIGN if offset else 0))


def map_columns(nbw: int, block: int, columns: int) -> int:
  """Columns the kernels' key/value maps need so that every window's aligned read fits."""
  return max(c * block - c * block % ALIGN + columns + (ALIGN if c * block % ALIGN else 0)
             for c in range(nbw))


def _for_each_block(shape: 'KernelShape', body, carry):
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


def _forward_kernel(shape, q_ref, k_ref, v_ref, tables_ref, own_ref, spread_ref, bias_rows_ref,
                    bias_cols_ref, out_ref):
  tables, own, spread = tables_ref[...], own_ref[...], spread_ref[...]
  bias_row = bias_rows_ref[pl.program_id(1)]

  def block(at, carry):
    keys, values = _window(k_ref, shape, at), _window(v_ref, shape, at)
    weights = _weights(_logits(_stack_heads(q_ref[at.c], shape), keys, tables, own, spread,
                               bias_row + bias_cols_ref[at.c], shape))
    out = jnp.dot(weights.astype(values.dtype), values, preferred_element_type=F32)
    out_ref[at.c] = _merge_heads(out, shape).astype(out_ref.dtype)
    return carry

  _for_each_block(shape, block, 0)


def _backward_kernel(shape, q_ref, k_ref, v_ref, tables_ref, own_ref, spread_ref, bias_rows_ref,
                     bias_cols_ref, out_ref, d_out_ref, d_q_ref, d_k_ref, d_v_ref, d_tables_ref,
                     d_k_strip, d_v_strip):
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

    d_tables_ref[...] += _for_each_block(shape, block, jnp.zeros(d_tables_ref.shape, F32))

  # Map rows [r*b, (r+1)*b) get nothing from later rows of blocks: write them, slide the strip.
  b, rest = shape.block, shape.rows - shape.block
  for strip, d_ref in ((d_k_strip, d_k_ref), (d_v_strip, d_v_ref)):
    d_ref[...] = strip[:b].astype(d_ref.dtype)
    if rest:
      strip[:rest] = strip[b:]
    strip[rest:] = jnp.zeros((b,) + strip.shape[1:], strip.dtype)


@dataclasses.dataclass(frozen=True)
class Call:
  """One pallas_call's grid and block specs: what it runs, and what its pipeline moves."""
  grid: tuple[int, ...]
  in_specs: list[pl.BlockSpec]
  out_specs: tuple[pl.BlockSpec, ...]
  out_shapes: tuple[jax.ShapeDtypeStruct, ...]
  scratch_shapes: tuple[Any, ...]
  semantics: tuple[str, ...]


def _output(like: Any, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
  """An output's shape, varying over the same manual mesh axes as `like` (inside shard_map)."""
  aval = jax.typeof(like) if isinstance(like, jax.Array) else like
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=getattr(aval, 'mat', None))


def _blocks_and_strips(shape: KernelShape, clamp_rows: bool):
  """Spec makers on the (image, block row) grid: a row's query blocks; the b+2h map rows its
  windows span (overlapping `pl.Element` rows); constant tables, one resident copy."""
  row = (lambda r: jnp.minimum(r, shape.nbh - 1)) if clamp_rows else (lambda r: r)
  blocks = lambda x: pl.BlockSpec((None, None) + x.shape[2:], lambda i, r: (i, row(r), 0, 0, 0))
  strip = lambda x: pl.BlockSpec(tuple(pl.Element(n) for n in (1, shape.rows) + x.shape[2:]),
                                 lambda i, r: (i, row(r) * shape.block, 0, 0))
  resident = lambda x: pl.BlockSpec(x.shape, lambda i, r: (0,) * len(x.shape),
                                    pipeline_mode=pl.Buffered(1))
  return blocks, strip, resident


def forward_call(shape: KernelShape, q, k, v, tables) -> Call:
  """Inputs (q, k, v, *tables) -> (out,)."""
  blocks, strip, resident = _blocks_and_strips(shape, clamp_rows=False)
  out_shapes = (_output(q, q.shape[:-1] + (shape.v_lanes,), q.dtype),)
  return Call((shape.images, shape.nbh), [blocks(q), strip(k), strip(v), *map(resident, tables)],
              tuple(map(blocks, out_shapes)), out_shapes, (), ('parallel', 'parallel'))


def backward_call(shape: KernelShape, q, k, v, tables) -> Call:
  """Inputs (q, k, v, *tables, out, d_out) -> (d_q, d_k, d_v, d_tables per image).

  The grid runs ceil((nbh*b + 2h) / b) block rows: bands of b map rows cover the padded map, and
  the last ceil(2h/b) steps only write what their strip holds.
  """
  blocks, strip, resident = _blocks_and_strips(shape, clamp_rows=True)
  band = lambda x: pl.BlockSpec((None, shape.block) + x.shape[2:], lambda i, r: (i, r, 0, 0))
  per_image = lambda x: pl.BlockSpec((None,) + x.shape[1:], lambda i, r: (i, 0, 0))
  out = _output(q, q.shape[:-1] + (shape.v_lanes,), q.dtype)
  out_shapes = (_output(q, q.shape, q.dtype), _output(k, k.shape, k.dtype),
                _output(v, v.shape, v.dtype), _output(q, (shape.images,) + tables[0].shape, F32))
  steps = -(-k.shape[1] // shape.block)
  return Call((shape.images, steps),
              [blocks(q), strip(k), strip(v), *map(resident, tables), blocks(out), blocks(out)],
              (blocks(q), band(k), band(v), per_image(out_shapes[3])), out_shapes,
              (pltpu.VMEM((shape.rows,) + k.shape[2:], F32),
               pltpu.VMEM((shape.rows,) + v.shape[2:], F32)),
              # An image's steps add into the same strips and table gradient: rows in order.
              ('parallel', 'arbitrary'))


def hbm_bytes(call: Call, inputs: list[Any]) -> int:
  """Bytes the call's pipeline moves between HBM and VMEM, counted from its block specs.

  Pallas copies a block in (or out) when its block index differs from the previous grid
  step's, so each spec costs its block's bytes times the number of index changes along the
  grid in row-major order (a resident table: once). A block's bytes are those of its TPU
  tiles: the last dimension padded to 128 lanes, the one before to `sublane_tile` rows.
  """
  steps = np.stack(np.unravel_index(np.arange(int(np.prod(call.grid))), call.grid))
  total = 0
  for spec, array in [*zip(call.in_specs, inputs), *zip(call.out_specs, call.out_shapes)]:
    block = [d.block_size if isinstance(d, (pl.Element, pl.Blocked)) else 1 if d is None else d
             for d in spec.block_shape]
    block[-2:] = _round_up(block[-2], sublane_tile(array.dtype)), _round_up(block[-1], 128)
    with jax.ensure_compile_time_eval():  # Concrete indices, even while a caller traces.
      index = np.stack([np.broadcast_to(np.asarray(i), steps.shape[1:])
                        for i in spec.index_map(*steps)])
    changes = 1 + int(np.any(index[:, 1:] != index[:, :-1], axis=0).sum())
    total += changes * int(np.prod(block)) * jnp.dtype(array.dtype).itemsize
  return total


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


def _compiler_params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _run(kernel, call: Call, shape: KernelShape, inputs, name: str, interpret: bool,
         backward: bool):
  cost = pl.CostEstimate(**kernel_flops(shape, backward), bytes_accessed=hbm_bytes(call, inputs))
  return pl.pallas_call(
      functools.partial(kernel, shape), grid=call.grid, in_specs=call.in_specs,
      out_specs=call.out_specs, out_shape=call.out_shapes, scratch_shapes=call.scratch_shapes,
      compiler_params=_compiler_params(call.semantics), cost_estimate=cost, interpret=interpret,
      name=name)(*inputs)


def _forward(block, heads, q, k, v, *tables, interpret):
  shape = KernelShape.of(block, heads, q, k, v, tables[0])
  return _run(_forward_kernel, forward_call(shape, q, k, v, tables), shape, (q, k, v, *tables),
              'halo_attention_forward', interpret, backward=False)


def _backward(block, heads, q, k, v, *rest, interpret):
  tables = rest[:5]
  shape = KernelShape.of(block, heads, q, k, v, tables[0])
  return _run(_backward_kernel, backward_call(shape, q, k, v, tables), shape, (q, k, v, *rest),
              'halo_attention_backward', interpret, backward=True)


def _on_platform(call, *args):
  """`call` compiled by Mosaic on TPU, interpreted on CPU (chosen when lowering, so a CPU host
  can export or compile for TPU)."""
  return jax.lax.platform_dependent(
      *args, cpu=functools.partial(call, interpret=INTERPRET),
      default=functools.partial(call, interpret=False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(block, heads, q, k, v, *tables):
  return _fused_forward(block, heads, q, k, v, *tables)[0]


def _fused_forward(block, heads, q, k, v, *tables):
  out, = _on_platform(functools.partial(_forward, block, heads), q, k, v, *tables)
  return out, (q, k, v, tables, out)


def _fused_backward(block, heads, residuals, d_out):
  q, k, v, tables, out = residuals
  d_q, d_k, d_v, d_tables = _on_platform(functools.partial(_backward, block, heads), q, k, v,
                                         *tables, out, d_out)
  return (d_q, d_k, d_v, d_tables.sum(0).astype(tables[0].dtype),
          *(jnp.zeros_like(t) for t in tables[1:]))


_fused.defvjp(_fused_forward, _fused_backward)
