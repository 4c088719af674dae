"""What every form of halo attention shares: the contract, the masks and position indices.

The contract (`Attend`). Every implementation is a function

  attend(q, k, v, rel_h, rel_w, bias_h, bias_w, *, block_size, halo_size, num_heads) -> out

of the inputs `layer.HaloAttention` prepares (plain.py documents each shape), returning the
[batch, nbh*qy, nbw*qx, heads*dv] output. There are five, and they differ only in how they compute
it: plain.py (loop-free, autodiff: the reference), rows.py (a row loop with a hand-written
backward, for CPU), pallas.py (fused TPU kernels), pallas_gpu.py (fused Triton kernels for NVIDIA
GPUs) and dense.py (each block one jax.nn.dot_product_attention call, cuDNN's on GPU);
spatial.py wraps any of them for image rows split over devices. Which one runs is decided in one
place, choose.py, once per network.

Einsum legend (plain.py, rows.py): b batch; i, j block row and column; y, x query row and column
inside a block; u, v key row and column inside a neighbourhood; n head; d channel of a head.
"""

from typing import Protocol

import jax
import numpy as np

from halonet import errors
from halonet.rounding import ceil_div

# Added to masked logits: finite, so a query whose whole window is padding (only possible in the
# cropped-away padded region) gets finite weights instead of NaN.
MASKED_LOGIT = -1e30


class Attend(Protocol):
  """The signature every implementation of the attention has (see the module docstring)."""

  def __call__(
    self,
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
  ) -> jax.Array: ...


def check_attention_args(
  block_size: int,
  halo_size: int,
  stride: int,
  mask_window: int,
) -> None:
  """Raises ValueError naming the first bad attention hyper-parameter."""
  if block_size <= 0:
    raise errors.ConfigError(f'block_size={block_size} must be positive')
  if halo_size < 0:
    raise errors.ConfigError(f'halo_size={halo_size} must be >= 0')
  if stride not in (1, 2):
    raise errors.ConfigError(f'stride={stride} must be 1 or 2')
  if block_size % stride:
    raise errors.ConfigError(
      f'block_size={block_size} must be a multiple of the attention stride {stride}'
    )
  if mask_window < 0 or (mask_window and mask_window % 2 == 0):
    raise errors.ConfigError(f'mask_window={mask_window} must be 0 (off) or a positive odd size')
  if mask_window > 2 * halo_size + 1:
    raise errors.ConfigError(
      f'mask_window={mask_window} does not fit in the neighbourhood of halo_size={halo_size}; '
      f'use at most {2 * halo_size + 1}'
    )


# How a (query, key) pair along one axis picks its relative-position embedding:
#   'offset': by the key's offset from the query in input pixels (the paper's relative position);
#   'window': by the key's place in the (b+2h) window minus the query's place among the block's
#             b/stride queries, as timm's HaloAttn indexes (the same as 'offset' at stride 1, up to
#             a shift of 2h; at stride 2 the query's place counts subsampled positions).
POSITION_INDEXINGS = ('offset', 'window')
# How a relative offset's embedding is built (layer.HaloAttention.position_embedding): two d_k-wide
# embeddings added, or SASA's halves concatenated.
POSITION_EMBEDDINGS = ('factorized', 'split')


def num_relative_offsets(block_size: int, halo_size: int, indexing: str = 'offset') -> int:
  """Rows of a relative table along one axis: every index `relative_index` can give."""
  window = block_size + 2 * halo_size
  return 2 * (block_size + halo_size) - 1 if indexing == 'offset' else 2 * window - 1


def key_bias(
  size: int,
  block: int,
  halo: int,
  stride: int,
  mask_window: int,
  num_blocks: int | None = None,
  mask_padding: bool = True,
) -> np.ndarray:
  """[blocks, queries or 1, b+2h] additive mask along one axis: padding, then mask_window.

  `num_blocks` (default: the fewest that cover `size`) may add blocks of padding only. With
  `mask_padding=False` padded keys stay visible (zero keys and values, as timm's HaloAttn pads).
  """
  num_blocks = num_blocks or ceil_div(size, block)
  starts = np.arange(num_blocks)[:, None, None] * block - halo
  keys = np.arange(block + 2 * halo)
  valid = (starts + keys >= 0) & (starts + keys < size)  # [blocks, 1, keys]
  if not mask_padding:
    valid = np.ones_like(valid)
  if mask_window:
    queries = np.arange(0, block, stride)[:, None] + halo  # In window coordinates.
    valid = valid & (np.abs(keys - queries) <= mask_window // 2)
  return np.where(valid, 0.0, MASKED_LOGIT).astype(np.float32)


def relative_index(block: int, halo: int, stride: int, indexing: str = 'offset') -> np.ndarray:
  """[queries, keys] index into a relative table for each (query, key) pair along one axis."""
  keys = np.arange(block + 2 * halo)[None, :]
  if indexing == 'window':
    return keys - np.arange(block // stride)[:, None] + block + 2 * halo - 1
  queries = np.arange(0, block, stride)[:, None]
  return keys - queries + block - 1  # Offset key - (query + halo), shifted to start at 0.
