"""Halo attention as two fused Pallas TPU kernels (forward, backward), FlashAttention style.

Same inputs and result as `plain.plain_attention`; `attention_impl='pallas'`. The plain form
writes every block's (b+2h)^2 logits and its overlapping key/value windows to HBM and reads them
back: under 1 FLOP per byte for H1 on TPU, memory-bound. Here only inputs and outputs touch HBM
(bench/pallas.py: 13-58x the plain form's arithmetic intensity in stages 1-3):

  * The grid is (image, row of query blocks). A step's blocks are its row's queries and, for
    keys and values, the b+2h map rows the row's neighbourhoods span, read straight from the
    padded maps (`pl.Element` rows, overlapping between steps): windows are never materialised.
    Constant tables stay resident in VMEM (one copy).
  * The forward kernel writes only the output; the backward recomputes logits and softmax, and
    writes the query gradient, the key/value map gradients (once: b rows per step from a strip
    that slides down the map, so image rows run in order) and the tables' gradient per image.
  * pallas_kernels.py holds the kernel bodies, and why they are laid out as
    they are; this file lays the inputs out for them, declares what each step moves
    (`hbm_bytes`, also XLA's cost estimate) and ties both directions into one custom VJP.

Folding the position terms and masks into the dot product and calling
`jax.nn.dot_product_attention` (dense.py) still materialises the overlapping windows, because
dense attention takes one key set per query block: it removes the logits' traffic but not the
windows'. Pallas' splash attention needs 128-multiple blocks and has no 2-D halo mask.

On CPU the kernels run in Pallas' interpreter (the tests); on TPU Mosaic compiles them (checked
without a TPU by compiling through libtpu: tests/attention/test_pallas.py). Mosaic kernels do not
run on GPU, so `attention_impl='pallas'` there is refused in one line; pallas_gpu.py is the GPU's.
"""

import dataclasses
import functools
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from halonet import errors
from halonet import sharding
from halonet.attention.common import MASKED_LOGIT
from halonet.attention.pallas_kernels import ALIGN
from halonet.attention.pallas_kernels import F32
from halonet.attention.pallas_kernels import KernelShape
from halonet.attention.pallas_kernels import backward_kernel
from halonet.attention.pallas_kernels import forward_kernel
from halonet.attention.pallas_kernels import kernel_flops
from halonet.attention.pallas_kernels import map_columns
from halonet.attention.pallas_kernels import round_up
from halonet.rounding import ceil_div

BACKENDS = ('tpu', 'cpu')  # Where the kernels run: compiled by Mosaic, or interpreted.
# Scoped VMEM the kernels may use. Every H7 layer at 600 px fits v5e's 16 MiB default (its
# stage-1 backward does not fit 8: compiled through libtpu), but the strips grow with the image
# width; 48 MiB stays below the 64 MiB of the smallest current TPU core.
VMEM_LIMIT_BYTES = 48 * 2**20
# How the kernels run on CPU: Pallas' generic interpreter (tests swap in its TPU interpreter,
# pltpu.InterpretParams, to look for races; its callbacks cannot sit beside a TPU lowering).
INTERPRET = True
# Logit of the columns a window is widened by: masked like padding (finite, so a fully masked
# row of padding queries gives no NaN).
WIDENED_COLUMN_LOGIT = MASKED_LOGIT


def check_backend(backend: str) -> None:
  """Raises one line if the kernels cannot run on `backend`."""
  if backend not in BACKENDS:
    raise errors.ConfigError(
      f"attention_impl='pallas' runs on TPU (and interpreted on CPU), not "
      f"on {backend}; use attention_impl='pallas_gpu' on GPU (or 'auto')"
    )


def pallas_attention(
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
  """`plain.plain_attention` (same arguments) as one kernel per direction, per device."""
  attend = functools.partial(_attention, block=block_size, halo=halo_size, heads=num_heads)
  return sharding.per_device_images(attend)(q, k, v, rel_h, rel_w, bias_h, bias_w)


def sublane_tile(dtype: Any) -> int:
  """Rows of one TPU memory tile of `dtype` (8 x 32-bit, 16 x 16-bit): what a block's
  second-minor dimension occupies in HBM and VMEM, rounded up."""
  return 8 * 4 // jnp.dtype(dtype).itemsize


def _attention(q, k, v, rel_h, rel_w, bias_h, bias_w, *, block, halo, heads):
  """Rearranges the inputs into the kernels' layout and back."""
  (qy, window, _), qx = rel_h.shape, rel_w.shape[0]
  batch, nbh, nbw = q.shape[0], q.shape[1] // qy, q.shape[2] // qx
  columns, queries = round_up(window, ALIGN), round_up(qy * qx, ALIGN)
  # [batch, nbh, nbw, queries, heads * dk]: one block's queries row-major, padded with zero
  # queries to a multiple of 8 rows (their rows are dropped below).
  q_blocks = q.reshape(batch, nbh, qy, nbw, qx, -1).transpose(0, 1, 3, 2, 4, 5)
  q_blocks = q_blocks.reshape(batch, nbh, nbw, qy * qx, -1)
  q_blocks = jnp.pad(q_blocks, ((0, 0),) * 3 + ((0, queries - qy * qx), (0, 0)))
  # Keys and values widened so that every window's aligned read fits (for_each_block).
  widen = ((0, 0), (0, 0), (0, map_columns(nbw, block, columns) - k.shape[2]), (0, 0))
  tables = position_tables(rel_h, rel_w, bias_h, bias_w, heads, columns, queries)
  out = _fused(block, heads, q_blocks, jnp.pad(k, widen), jnp.pad(v, widen), *tables)
  out = out[:, :, :, : qy * qx].reshape(batch, nbh, nbw, qy, qx, -1).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(batch, nbh * qy, nbw * qx, -1)


def position_tables(
  rel_h: jax.Array,
  rel_w: jax.Array,
  bias_h: jax.Array,
  bias_w: jax.Array,
  heads: int,
  columns: int,
  queries: int,
) -> tuple[jax.Array, ...]:
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
  tables = jnp.tile(
    jnp.concatenate([rel_h.reshape(qy * window, -1), rel_w.reshape(qx * window, -1)]), (1, heads)
  )
  # Table row t is (query row or column, key row or column) = divmod(t, window).
  table_query, table_key = np.divmod(np.arange((qy + qx) * window), window)
  is_row = np.arange((qy + qx) * window) < qy * window
  own = np.where(is_row, q_row[:, None] == table_query, q_col[:, None] == table_query - qy)
  spread = np.where(is_row[:, None], table_key[:, None] == key_row, table_key[:, None] == key_col)
  pad = ((0, 0), (0, queries - qy * qx), (0, 0))
  bias_rows = jnp.broadcast_to(bias_h, (bias_h.shape[0], qy, window))[:, q_row][..., key_row]
  bias_cols = jnp.broadcast_to(bias_w, (bias_w.shape[0], qx, window))[:, q_col]
  bias_cols = jnp.where(
    key_col < window, bias_cols[..., np.minimum(key_col, window - 1)], WIDENED_COLUMN_LOGIT
  )
  return (
    tables,
    jnp.asarray(np.pad(own, pad[1:]), F32),
    jnp.asarray(spread, jnp.bfloat16),  # 0/1: exact in bfloat16.
    jnp.pad(bias_rows, pad).astype(F32),
    jnp.pad(bias_cols, pad).astype(F32),
  )


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
  strip = lambda x: pl.BlockSpec(
    tuple(pl.Element(n) for n in (1, shape.rows) + x.shape[2:]),
    lambda i, r: (i, row(r) * shape.block, 0, 0),
  )
  resident = lambda x: pl.BlockSpec(
    x.shape, lambda i, r: (0,) * len(x.shape), pipeline_mode=pl.Buffered(1)
  )
  return blocks, strip, resident


def forward_call(shape: KernelShape, q, k, v, tables) -> Call:
  """Inputs (q, k, v, *tables) -> (out,)."""
  blocks, strip, resident = _blocks_and_strips(shape, clamp_rows=False)
  out_shapes = (_output(q, q.shape[:-1] + (shape.v_lanes,), q.dtype),)
  return Call(
    (shape.images, shape.nbh),
    [blocks(q), strip(k), strip(v), *map(resident, tables)],
    tuple(map(blocks, out_shapes)),
    out_shapes,
    (),
    ('parallel', 'parallel'),
  )


def backward_call(shape: KernelShape, q, k, v, tables) -> Call:
  """Inputs (q, k, v, *tables, out, d_out) -> (d_q, d_k, d_v, d_tables per image).

  The grid runs ceil((nbh*b + 2h) / b) block rows: bands of b map rows cover the padded map, and
  the last ceil(2h/b) steps only write what their strip holds.
  """
  blocks, strip, resident = _blocks_and_strips(shape, clamp_rows=True)
  band = lambda x: pl.BlockSpec((None, shape.block) + x.shape[2:], lambda i, r: (i, r, 0, 0))
  per_image = lambda x: pl.BlockSpec((None,) + x.shape[1:], lambda i, r: (i, 0, 0))
  out = _output(q, q.shape[:-1] + (shape.v_lanes,), q.dtype)
  out_shapes = (
    _output(q, q.shape, q.dtype),
    _output(k, k.shape, k.dtype),
    _output(v, v.shape, v.dtype),
    _output(q, (shape.images,) + tables[0].shape, F32),
  )
  steps = ceil_div(k.shape[1], shape.block)
  return Call(
    (shape.images, steps),
    [blocks(q), strip(k), strip(v), *map(resident, tables), blocks(out), blocks(out)],
    (blocks(q), band(k), band(v), per_image(out_shapes[3])),
    out_shapes,
    (pltpu.VMEM((shape.rows,) + k.shape[2:], F32), pltpu.VMEM((shape.rows,) + v.shape[2:], F32)),
    # An image's steps add into the same strips and table gradient: rows in order.
    ('parallel', 'arbitrary'),
  )


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
    block = [
      d.block_size if isinstance(d, (pl.Element, pl.Blocked)) else 1 if d is None else d
      for d in spec.block_shape
    ]
    block[-2:] = round_up(block[-2], sublane_tile(array.dtype)), round_up(block[-1], 128)
    with jax.ensure_compile_time_eval():  # Concrete indices, even while a caller traces.
      index = np.stack(
        [np.broadcast_to(np.asarray(i), steps.shape[1:]) for i in spec.index_map(*steps)]
      )
    changes = 1 + int(np.any(index[:, 1:] != index[:, :-1], axis=0).sum())
    total += changes * int(np.prod(block)) * jnp.dtype(array.dtype).itemsize
  return total


def _compiler_params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _run(
  kernel, call: Call, shape: KernelShape, inputs, name: str, interpret: bool, backward: bool
):
  cost = pl.CostEstimate(**kernel_flops(shape, backward), bytes_accessed=hbm_bytes(call, inputs))
  return pl.pallas_call(
    functools.partial(kernel, shape),
    grid=call.grid,
    in_specs=call.in_specs,
    out_specs=call.out_specs,
    out_shape=call.out_shapes,
    scratch_shapes=call.scratch_shapes,
    compiler_params=_compiler_params(call.semantics),
    cost_estimate=cost,
    interpret=interpret,
    name=name,
  )(*inputs)


def _forward(block, heads, q, k, v, *tables, interpret):
  shape = KernelShape.of(block, heads, q, k, v, tables[0])
  return _run(
    forward_kernel,
    forward_call(shape, q, k, v, tables),
    shape,
    (q, k, v, *tables),
    'halo_attention_forward',
    interpret,
    backward=False,
  )


def _backward(block, heads, q, k, v, *rest, interpret):
  tables = rest[:5]
  shape = KernelShape.of(block, heads, q, k, v, tables[0])
  return _run(
    backward_kernel,
    backward_call(shape, q, k, v, tables),
    shape,
    (q, k, v, *rest),
    'halo_attention_backward',
    interpret,
    backward=True,
  )


def _on_platform(call, *args):
  """`call` compiled by Mosaic on TPU, interpreted on CPU (chosen when lowering, so a CPU host
  can export or compile for TPU)."""
  return jax.lax.platform_dependent(
    *args,
    cpu=functools.partial(call, interpret=INTERPRET),
    default=functools.partial(call, interpret=False),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(block, heads, q, k, v, *tables):
  return _fused_forward(block, heads, q, k, v, *tables)[0]


def _fused_forward(block, heads, q, k, v, *tables):
  (out,) = _on_platform(functools.partial(_forward, block, heads), q, k, v, *tables)
  return out, (q, k, v, tables, out)


def _fused_backward(block, heads, residuals, d_out):
  q, k, v, tables, out = residuals
  d_q, d_k, d_v, d_tables = _on_platform(
    functools.partial(_backward, block, heads), q, k, v, *tables, out, d_out
  )
  return (
    d_q,
    d_k,
    d_v,
    d_tables.sum(0).astype(tables[0].dtype),
    *(jnp.zeros_like(t) for t in tables[1:]),
  )


_fused.defvjp(_fused_forward, _fused_backward)
