"""Halo attention as four fused Pallas GPU (Triton) kernels, FlashAttention style.

Same inputs and result as `plain.plain_attention`; `attention_impl='pallas_gpu'`, a candidate
of 'auto' on GPU (measure.py times it against the others on the device). The plain form writes
every block's (b+2h)^2 logits and its overlapping key/value windows to HBM; here they stay in
registers and shared memory:

  * Forward, one program per (image x head, query block, tile of value channels): the block's
    queries walk the b+2h key rows of their neighbourhood, each a tile read straight from the
    padded key and value maps (windows are never materialised), with an online softmax. It
    writes the output and each query's log-sum-exp.
  * Backward, three kernels, none with atomics. The query kernel recomputes each tile's
    probabilities from the log-sum-exp and writes the query gradient and the position terms'
    gradients. The key kernel and the value kernel (one program per tile of value channels)
    each own a b x b block of keys and visit the few query blocks whose neighbourhoods contain
    it (((b+2h-1) // b + 1)^2 of them), so overlapping windows add their gradients in registers
    and every gradient is written once.
  * Position terms and masks are folded in before the kernels: each query's row terms
    q.r_h + bias_h (one per key row) and column terms q.r_w + bias_w (one per key column), a
    1/(b+2h) fraction of the logits each, computed by XLA; autodiff carries their gradients
    back to q and the tables.

Triton wants power-of-two tiles of at least 16 for its matrix units: queries, channels, key
columns are zero-padded to them and the padded key columns carry `EXCLUDED_LOGIT`, which
outweighs any mask, so they never get weight.

On CPU the kernels run in Pallas' interpreter (the tests); on an NVIDIA GPU Triton compiles them
(lowered without a GPU: tests/attention/test_pallas_gpu.py). Not on TPU: attention_impl='pallas'
is TPU's.
"""

import dataclasses
import functools
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from halonet import errors
from halonet import sharding
from halonet.attention.common import MASKED_LOGIT
from halonet.rounding import ceil_div

BACKENDS = ('gpu', 'cpu')  # Where the kernels run: compiled by Triton, or interpreted.
F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))  # a @ b.T
# Logit of the padded key columns of a tile: below any masked logit, so even a query whose
# whole neighbourhood is masked (uniform over it, as in the plain form) gives them no weight.
EXCLUDED_LOGIT = 2 * MASKED_LOGIT
MIN_TILE = 16  # Triton's smallest matrix-unit operand side.
# Value channels per program: H7's 256-wide heads in one tile would need more registers than a
# thread has (ptxas: 255 and spills, bench/gpu_aot.py).
MAX_VALUE_TILE = 64


def check_backend(backend: str) -> None:
  """Raises one line if the kernels cannot run on `backend`."""
  if backend not in BACKENDS:
    raise errors.ConfigError(
      f"attention_impl='pallas_gpu' runs on GPU (and interpreted on CPU), not on {backend}; "
      f"use attention_impl='pallas' on TPU (or 'auto')"
    )


def tile(n: int) -> int:
  """The power of two >= max(n, MIN_TILE) a tile side of n elements is padded to."""
  return max(MIN_TILE, pl.next_power_of_2(n))


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The static sizes of one layer's kernels (hashable: the custom VJP's static argument).

  block b, window b+2h, nbh x nbw query blocks of `queries`; key maps `key_rows` x `key_cols`
  (padded by h); every tile side padded to `tile`.
  """

  block: int
  window: int
  nbh: int
  nbw: int
  queries: int
  key_rows: int
  key_cols: int
  value_channels: int  # Of one head, padded to a tile.

  @property
  def value_tile(self) -> int:  # Value channels one program holds: bounds its registers.
    return min(self.value_channels, MAX_VALUE_TILE)

  @property
  def value_tiles(self) -> int:
    return self.value_channels // self.value_tile

  @property
  def q_tile(self) -> int:
    return tile(self.queries)

  @property
  def num_warps(self) -> int:  # 8 for 128-query tiles (b = 9..11): H7's fit without spills.
    return 8 if self.q_tile >= 128 else 4

  @property
  def w_tile(self) -> int:  # Key columns of one forward tile: a window row.
    return tile(self.window)

  @property
  def b_tile(self) -> int:  # Key columns of one key-kernel tile: a block row.
    return tile(self.block)

  @property
  def spans(self) -> int:  # Query blocks along an axis whose windows reach one key block.
    return (self.window - 1) // self.block + 1

  @property
  def key_blocks(self) -> tuple[int, int]:
    return ceil_div(self.key_rows, self.block), ceil_div(self.key_cols, self.block)

  @property
  def column_terms(self) -> int:  # Width of the column terms: every tile either kernel reads.
    return max(self.w_tile, (self.spans - 1) * self.block + self.b_tile)

  @property
  def padded_keys(self) -> tuple[int, int]:
    """Rows and columns of the padded key maps: every tile read stays inside them."""
    blocks_r, blocks_c = self.key_blocks
    columns = max(
      (self.nbw - 1) * self.block + self.w_tile, (blocks_c - 1) * self.block + self.b_tile
    )
    return blocks_r * self.block, columns


def pallas_gpu_attention(
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
  """`plain.plain_attention` (same arguments and result) as fused kernels, per device."""
  attend = functools.partial(_attention, block=block_size, heads=num_heads)
  return sharding.per_device_images(attend)(q, k, v, rel_h, rel_w, bias_h, bias_w)


def _pad_to(x: jax.Array, shape: tuple[int, ...], value: float = 0.0) -> jax.Array:
  return jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, shape)], constant_values=value)


def _attention(q, k, v, rel_h, rel_w, bias_h, bias_w, *, block, heads):
  """Lays the inputs out for the kernels (head-major, tiles padded) and the output back."""
  (qy, window, dk), qx = rel_h.shape, rel_w.shape[0]
  batch, nbh, nbw = q.shape[0], q.shape[1] // qy, q.shape[2] // qx
  dv = v.shape[-1] // heads
  geometry = Geometry(block, window, nbh, nbw, qy * qx, k.shape[1], k.shape[2], tile(dv))
  g = geometry
  q = q.reshape(batch, nbh, qy, nbw, qx, heads, dk)
  row = jnp.einsum('biyjxnd,yud->bnijyxu', q, rel_h, preferred_element_type=F32)
  col = jnp.einsum('biyjxnd,xvd->bnijyxv', q, rel_w, preferred_element_type=F32)
  row = row + bias_h[None, None, :, None, :, None, :]
  col = col + bias_w[None, None, None, :, None, :, :]
  images = batch * heads
  per_block = lambda x: x.reshape(images, nbh, nbw, g.queries, x.shape[-1])
  rows = _pad_to(per_block(row), (images, nbh, nbw, g.q_tile, g.w_tile))
  cols = _pad_to(per_block(col), (images, nbh, nbw, g.q_tile, window))
  cols = _pad_to(cols, cols.shape[:-1] + (g.column_terms,), EXCLUDED_LOGIT)
  q_blocks = per_block(q.transpose(0, 5, 1, 3, 2, 4, 6))
  q_blocks = _pad_to(q_blocks, q_blocks.shape[:-2] + (g.q_tile, tile(dk)))

  def head_major(x: jax.Array, width: int) -> jax.Array:
    x = x.reshape(batch, g.key_rows, g.key_cols, heads, width).transpose(0, 3, 1, 2, 4)
    return _pad_to(
      x.reshape(images, g.key_rows, g.key_cols, width), (images, *g.padded_keys, tile(width))
    )

  out = _fused(geometry, q_blocks, rows, cols, head_major(k, dk), head_major(v, dv))
  out = out[..., : g.queries, :dv].reshape(batch, heads, nbh, nbw, qy, qx, dv)
  return out.transpose(0, 2, 4, 3, 5, 1, 6).reshape(batch, nbh * qy, nbw * qx, heads * dv)


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T in float32."""
  return jax.lax.dot_general(a, b, NT, preferred_element_type=F32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.dot(a, b, preferred_element_type=F32)


def _divmod(n: Any, d: int) -> tuple[Any, Any]:
  """divmod of a non-negative index (lax's C-style ops: jnp's floor forms do not lower to
  Triton here)."""
  return jax.lax.div(n, d), jax.lax.rem(n, d)


def _block_of(g: Geometry, program: Any) -> tuple[Any, Any]:
  """(row, column) of the query (or key) block a program's flat grid index names."""
  return _divmod(program, g.nbw)


def forward_kernel(g: Geometry, q_ref, rows_ref, cols_ref, k_ref, v_ref, out_ref, lse_ref):
  """One query block against its neighbourhood, key row by key row, online softmax; one tile of
  value channels per program."""
  image, (i, j), t = pl.program_id(0), _block_of(g, pl.program_id(1)), pl.program_id(2)
  q = q_ref[...]
  cols = cols_ref[:, pl.ds(0, g.w_tile)]
  columns, channels = pl.ds(j * g.block, g.w_tile), pl.ds(t * g.value_tile, g.value_tile)

  def key_row(u, carry):
    top, total, acc = carry
    keys = k_ref[image, i * g.block + u, columns, :]
    values = v_ref[image, i * g.block + u, columns, channels]
    logits = _dot_t(q, keys) + rows_ref[:, u][:, None] + cols
    new_top = jnp.maximum(top, logits.max(axis=1))
    weights = jnp.exp(logits - new_top[:, None])
    rescale = jnp.exp(top - new_top)
    acc = acc * rescale[:, None] + _dot(weights.astype(values.dtype), values)
    return new_top, total * rescale + weights.sum(axis=1), acc

  start = (
    jnp.full((g.q_tile,), -jnp.inf, F32),
    jnp.zeros((g.q_tile,), F32),
    jnp.zeros(out_ref.shape, F32),
  )
  top, total, acc = jax.lax.fori_loop(0, g.window, key_row, start)
  out_ref[...] = (acc / total[:, None]).astype(out_ref.dtype)
  lse_ref[...] = top + jnp.log(total)  # The same from every value tile's program.


def _d_weights(g: Geometry, d_out_at, values_at, shape: tuple[int, int]) -> jax.Array:
  """dO @ V.T, [queries, keys] = `shape`, summed over the value-channel tiles (each a
  [rows, value_tile] read by `d_out_at(channels)` and `values_at(channels)`)."""

  def channel_tile(t, acc):
    channels = pl.ds(t * g.value_tile, g.value_tile)
    return acc + _dot_t(d_out_at(channels), values_at(channels))

  return jax.lax.fori_loop(0, g.value_tiles, channel_tile, jnp.zeros(shape, F32))


def query_kernel(
  g: Geometry,
  q_ref,
  rows_ref,
  cols_ref,
  k_ref,
  v_ref,
  lse_ref,
  d_out_ref,
  delta_ref,
  d_q_ref,
  d_rows_ref,
  d_cols_ref,
):
  """A query block's gradients: its queries' and its row and column terms'."""
  image, (i, j) = pl.program_id(0), _block_of(g, pl.program_id(1))
  q = q_ref[...]
  cols = cols_ref[:, pl.ds(0, g.w_tile)]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  columns = pl.ds(j * g.block, g.w_tile)

  def key_row(u, carry):
    d_q, d_cols = carry
    keys = k_ref[image, i * g.block + u, columns, :]
    weights = jnp.exp(_dot_t(q, keys) + rows_ref[:, u][:, None] + cols - lse)
    d_weights = _d_weights(
      g,
      lambda c: d_out_ref[:, c],
      lambda c: v_ref[image, i * g.block + u, columns, c],
      (g.q_tile, g.w_tile),
    )
    d_logits = weights * (d_weights - delta)
    d_rows_ref[:, u] = d_logits.sum(axis=1)
    return d_q + _dot(d_logits.astype(keys.dtype), keys), d_cols + d_logits

  start = (jnp.zeros(d_q_ref.shape, F32), jnp.zeros(d_cols_ref.shape, F32))
  d_q, d_cols = jax.lax.fori_loop(0, g.window, key_row, start)
  d_q_ref[...] = d_q.astype(d_q_ref.dtype)
  d_cols_ref[...] = d_cols


def _over_visits(g: Geometry, refs, image, key_i, key_j, r, keys, body, acc):
  """Folds `body(acc, visit)` over the query blocks whose windows hold key row r of block
  (key_i, key_j); `visit` has each one's queries, d_out reader, delta and probabilities."""
  q_ref, rows_ref, cols_ref, lse_ref, d_out_ref, delta_ref = refs

  def visit(n, acc):
    di, dj = _divmod(n, g.spans)
    i, j, u = key_i - di, key_j - dj, di * g.block + r  # u: the key row in i's window.
    valid = (i >= 0) & (i < g.nbh) & (j >= 0) & (j < g.nbw) & (u < g.window)
    i, j = jnp.clip(i, 0, g.nbh - 1), jnp.clip(j, 0, g.nbw - 1)
    q = q_ref[image, i, j]
    row = rows_ref[image, i, j, :, jnp.minimum(u, g.w_tile - 1)][:, None]
    cols = cols_ref[image, i, j, :, pl.ds(dj * g.block, g.b_tile)]
    weights = jnp.exp(_dot_t(q, keys) + row + cols - lse_ref[image, i, j][:, None])
    weights = jnp.where(valid, weights, 0.0)
    d_out_at = lambda c: d_out_ref[image, i, j, :, c]
    return body(acc, q, d_out_at, delta_ref[image, i, j][:, None], weights)

  return jax.lax.fori_loop(0, g.spans**2, visit, acc)


def _store_key_row(g: Geometry, ref, at, value) -> None:
  """Writes a key row's tile; columns past the block belong to the next program's keys."""
  in_block = jax.lax.broadcasted_iota(jnp.int32, value.shape, 0) < g.block
  plgpu.store(ref.at[at], value.astype(ref.dtype), mask=in_block)


def key_kernel(
  g: Geometry, q_ref, rows_ref, cols_ref, k_ref, v_ref, lse_ref, d_out_ref, delta_ref, d_k_ref
):
  """A b x b block of keys' gradients, summed over every query block whose window holds it."""
  image, (key_i, key_j) = pl.program_id(0), _block_of_keys(g, pl.program_id(1))
  columns = pl.ds(key_j * g.block, g.b_tile)
  refs = (q_ref, rows_ref, cols_ref, lse_ref, d_out_ref, delta_ref)

  def key_row(r, _):
    keys = k_ref[image, key_i * g.block + r, columns, :]
    values_at = lambda c: v_ref[image, key_i * g.block + r, columns, c]

    def body(d_k, q, d_out_at, delta, weights):
      d_logits = weights * (_d_weights(g, d_out_at, values_at, (g.q_tile, g.b_tile)) - delta)
      return d_k + _dot(d_logits.T.astype(q.dtype), q)

    d_k = _over_visits(g, refs, image, key_i, key_j, r, keys, body, jnp.zeros(keys.shape, F32))
    _store_key_row(g, d_k_ref, (image, key_i * g.block + r, columns, slice(None)), d_k)
    return 0

  jax.lax.fori_loop(0, g.block, key_row, 0)


def value_kernel(
  g: Geometry, q_ref, rows_ref, cols_ref, k_ref, lse_ref, d_out_ref, delta_ref, d_v_ref
):
  """A b x b block of values' gradients in one tile of channels, summed like key_kernel's."""
  image, (key_i, key_j), t = (
    pl.program_id(0),
    _block_of_keys(g, pl.program_id(1)),
    pl.program_id(2),
  )
  columns, channels = pl.ds(key_j * g.block, g.b_tile), pl.ds(t * g.value_tile, g.value_tile)
  refs = (q_ref, rows_ref, cols_ref, lse_ref, d_out_ref, delta_ref)

  def key_row(r, _):
    keys = k_ref[image, key_i * g.block + r, columns, :]

    def body(d_v, q, d_out_at, delta, weights):
      d_out = d_out_at(channels)
      return d_v + _dot(weights.T.astype(d_out.dtype), d_out)

    start = jnp.zeros((g.b_tile, g.value_tile), F32)
    d_v = _over_visits(g, refs, image, key_i, key_j, r, keys, body, start)
    _store_key_row(g, d_v_ref, (image, key_i * g.block + r, columns, channels), d_v)
    return 0

  jax.lax.fori_loop(0, g.block, key_row, 0)


def _block_of_keys(g: Geometry, program: Any) -> tuple[Any, Any]:
  return _divmod(program, g.key_blocks[1])


def _blocks(x: jax.Array, value_tiles: int = 0) -> pl.BlockSpec:
  """A query block's tile of a [images, nbh, nbw, ...] array on the (image, block[, value tile])
  grid; with `value_tiles`, the last axis's tile of the program's value channels."""
  nbw = x.shape[2]
  shape = x.shape[3:-1] + (x.shape[-1] // (value_tiles or 1),)
  tail = x.ndim - 4

  def index(n, b, t=0):
    return (n, b // nbw, b % nbw) + (0,) * tail + (t if value_tiles else 0,)

  return pl.BlockSpec((None, None, None) + shape, index)


WHOLE = pl.BlockSpec(memory_space=pl.ANY)  # Read by explicit (overlapping) tiles in the kernel.


def _call(kernel, g, grid, in_specs, out_shapes, out_specs, name, interpret, *inputs):
  return pl.pallas_call(
    functools.partial(kernel, g),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shapes,
    compiler_params=plgpu.CompilerParams(num_warps=g.num_warps, num_stages=2),
    interpret=interpret,
    name=name,
  )(*inputs)


def _forward(g, q, rows, cols, k, v, *, interpret):
  images = q.shape[0]
  out = jax.ShapeDtypeStruct(q.shape[:-1] + (v.shape[-1],), q.dtype)
  lse = jax.ShapeDtypeStruct(q.shape[:-1], F32)
  return _call(
    forward_kernel,
    g,
    (images, g.nbh * g.nbw, g.value_tiles),
    [_blocks(q), _blocks(rows), _blocks(cols), WHOLE, WHOLE],
    (out, lse),
    (_blocks(out, g.value_tiles), _blocks_of_rows(lse)),
    'halo_attention_gpu_forward',
    interpret,
    q,
    rows,
    cols,
    k,
    v,
  )


def _blocks_of_rows(x: jax.Array) -> pl.BlockSpec:
  """A query block's [queries] of a [images, nbh, nbw, queries] array (the log-sum-exp)."""
  nbw = x.shape[2]
  return pl.BlockSpec((None, None, None, x.shape[3]), lambda n, b, t=0: (n, b // nbw, b % nbw, 0))


def _backward(g, q, rows, cols, k, v, lse, d_out, delta, *, interpret):
  images = q.shape[0]
  shapes = (
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    jax.ShapeDtypeStruct(rows.shape, F32),
    jax.ShapeDtypeStruct(cols.shape[:-1] + (g.w_tile,), F32),
  )
  inputs = (q, rows, cols, k, v, lse, d_out, delta)
  in_specs = [_blocks(q), _blocks(rows), _blocks(cols), WHOLE, WHOLE]
  in_specs += [_blocks_of_rows(lse), _blocks(d_out), _blocks_of_rows(delta)]
  d_q, d_rows, d_cols = _call(
    query_kernel,
    g,
    (images, g.nbh * g.nbw),
    in_specs,
    shapes,
    tuple(map(_blocks, shapes)),
    'halo_attention_gpu_backward_queries',
    interpret,
    *inputs,
  )
  key_blocks = g.key_blocks[0] * g.key_blocks[1]
  (d_k,) = _call(
    key_kernel,
    g,
    (images, key_blocks),
    [WHOLE] * len(inputs),
    (jax.ShapeDtypeStruct(k.shape, k.dtype),),
    (WHOLE,),
    'halo_attention_gpu_backward_keys',
    interpret,
    *inputs,
  )
  without_values = inputs[:4] + inputs[5:]
  (d_v,) = _call(
    value_kernel,
    g,
    (images, key_blocks, g.value_tiles),
    [WHOLE] * len(without_values),
    (jax.ShapeDtypeStruct(v.shape, v.dtype),),
    (WHOLE,),
    'halo_attention_gpu_backward_values',
    interpret,
    *without_values,
  )
  return d_q, d_rows, d_cols, d_k, d_v


def _on_platform(call, *args):
  """`call` compiled by Triton on GPU, interpreted on CPU (chosen when lowering, so a CPU host
  can export for GPU)."""
  return jax.lax.platform_dependent(
    *args,
    cpu=functools.partial(call, interpret=True),
    default=functools.partial(call, interpret=False),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(g, q, rows, cols, k, v):
  return _fused_forward(g, q, rows, cols, k, v)[0]


def _fused_forward(g, q, rows, cols, k, v):
  out, lse = _on_platform(functools.partial(_forward, g), q, rows, cols, k, v)
  return out, (q, rows, cols, k, v, out, lse)


def _fused_backward(g, residuals, d_out):
  q, rows, cols, k, v, out, lse = residuals
  delta = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1)
  d_q, d_rows, d_cols, d_k, d_v = _on_platform(
    functools.partial(_backward, g), q, rows, cols, k, v, lse, d_out, delta
  )
  # Unwritten entries (rows past the window, keys past the map) fall in the padding, whose
  # gradient the pads drop; the column terms' cotangent takes their full width.
  return d_q, d_rows, _pad_to(d_cols, cols.shape), d_k, d_v


_fused.defvjp(_fused_forward, _fused_backward)
