"""The one place that says which implementation of the attention runs where.

`attention_impl` names one (IMPLEMENTATIONS) or is 'auto'. On TPU and GPU, 'auto' is
what measure.py found fastest for each layer on the device itself (the run's `attention_choice`);
without a measurement, the loop-free plain form. On CPU, the row loop with its hand-written
backward pass, which keeps one row's logits in cache (bench/run.py).
"""

from collections.abc import Callable, Sequence

import jax

from halonet import errors
from halonet.attention import dense
from halonet.attention import pallas
from halonet.attention import pallas_gpu
from halonet.attention import plain
from halonet.attention import rows

IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
  'plain': plain.plain_attention,
  'rows': rows.rows_attention,
  'pallas': pallas.pallas_attention,
  'dense': dense.dense_attention,
  'pallas_gpu': pallas_gpu.pallas_gpu_attention,
}
AUTO_IMPLEMENTATION = {'cpu': 'rows'}


def check_impl(attention_impl: str) -> None:
  """Raises one line unless `attention_impl` names an implementation or 'auto'."""
  if attention_impl != 'auto' and attention_impl not in IMPLEMENTATIONS:
    raise errors.ConfigError(
      f'attention_impl={attention_impl!r} is not one of {["auto", *IMPLEMENTATIONS]}'
    )


def resolve_impl(attention_impl: str, backend: str | None = None) -> str:
  """The implementation `attention_impl` names; 'auto' picks by backend (default: JAX's).

  Raises one line if the implementation cannot run on the backend.
  """
  check_impl(attention_impl)
  backend = backend or jax.default_backend()
  if attention_impl == 'auto':
    return AUTO_IMPLEMENTATION.get(backend, 'plain')
  if attention_impl == 'pallas':
    pallas.check_backend(backend)
  if attention_impl == 'pallas_gpu':
    pallas_gpu.check_backend(backend)
  return attention_impl


def layer_key(
  height: int,
  width: int,
  channels: int,
  qk_width: int,
  value_width: int,
  num_heads: int,
  block_size: int,
  halo_size: int,
  stride: int,
  mask_window: int,
  dtype: str,
) -> str:
  """Names a layer's shape (its input map, widths, window, dtype) in a run's choice."""
  return (
    f'{height}x{width}x{channels} qk{qk_width} v{value_width} heads{num_heads} '
    f'b{block_size} h{halo_size} s{stride} mask{mask_window} {dtype}'
  )


def impl_for(
  attention_impl: str, choice: Sequence[tuple[str, str]], key: str, backend: str | None = None
) -> str:
  """The form a layer of shape `key` runs: with 'auto', the run's measured choice for it if it
  has one (measure.py), else resolve_impl's rule."""
  chosen = dict(choice).get(key) if attention_impl == 'auto' else None
  return chosen or resolve_impl(attention_impl, backend)
