"""The one place that says which form of the attention runs where.

`config.model.attention_impl` names a form (IMPLEMENTATIONS) or is 'auto'. The network turns it
into one `AttentionPlan` when it is built and hands that to every attention layer: the form each
layer runs, decided once. On TPU and GPU, 'auto' is what measure.py found fastest for each layer
shape on the device itself; without a measurement, the loop-free plain form. On CPU, the row
loop with its hand-written backward pass, which keeps one row's logits in cache (bench/run.py).
"""

from collections.abc import Callable, Sequence
import dataclasses

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerShape:
  """What decides which form of a layer is fastest: its input map, widths, window and compute
  dtype (not the batch). Built by HaloAttention.layer_shape alone; its key() names the layer in a
  plan, in measure.py's cache and in a run's attention_choice.json."""

  height: int
  width: int
  channels: int
  qk_width: int
  value_width: int
  num_heads: int
  block_size: int
  halo_size: int
  stride: int
  mask_window: int
  dtype: str

  def key(self) -> str:
    return (
      f'{self.height}x{self.width}x{self.channels} qk{self.qk_width} v{self.value_width} '
      f'heads{self.num_heads} b{self.block_size} h{self.halo_size} s{self.stride} '
      f'mask{self.mask_window} {self.dtype}'
    )


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """The form every attention layer of a network runs: `measured[layer key]` where the run
  measured one (measure.py), else `default`. Hashable, so it is one field of a Flax module."""

  default: str = 'plain'
  measured: tuple[tuple[str, str], ...] = ()  # (LayerShape.key(), form), sorted.

  def __post_init__(self):
    for form in (self.default, *(form for _, form in self.measured)):
      if form not in IMPLEMENTATIONS:
        raise errors.ConfigError(f'attention form {form!r} is not one of {[*IMPLEMENTATIONS]}')

  def form(self, shape: LayerShape) -> str:
    return dict(self.measured).get(shape.key(), self.default)

  def attend(self, shape: LayerShape) -> Callable[..., jax.Array]:
    return IMPLEMENTATIONS[self.form(shape)]

  def with_measured(self, measured: Sequence[tuple[str, str]]) -> 'AttentionPlan':
    return dataclasses.replace(self, measured=tuple(sorted(measured)))


def plan(
  attention_impl: str, backend: str | None = None, measured: Sequence[tuple[str, str]] = ()
) -> AttentionPlan:
  """The plan for `attention_impl` on `backend` (default: JAX's): the form it names (refused in
  one line where it cannot run), or for 'auto' the measured forms over the backend's rule."""
  default = resolve_impl(attention_impl, backend)
  return AttentionPlan(default, tuple(sorted(measured)) if attention_impl == 'auto' else ())
