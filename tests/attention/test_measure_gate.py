"""The measured choice's correctness gate (halonet/attention/measure.py): planted forms a little
off are refused in bfloat16 and float32, and no correct form is refused on a real layer."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from configs import halonet as named_configs
from halonet.attention import choose
from halonet.attention import measure
from halonet.attention import plain
from halonet.models import networks


def _scaled_output(scale, head=None):
  """The plain form with its output scaled (computed in float32, then rounded back): all heads,
  or the one given."""

  def form(q, k, v, *args, num_heads, **kwargs):
    out = plain.plain_attention(q, k, v, *args, num_heads=num_heads, **kwargs)
    factor = jnp.full(out.shape[-1], scale, jnp.float32)
    if head is not None:
      width = out.shape[-1] // num_heads
      factor = jnp.ones(out.shape[-1], jnp.float32).at[head * width : (head + 1) * width].set(scale)
    return (out.astype(jnp.float32) * factor).astype(out.dtype)

  return form


def _scaled_gradient(scale):
  """The plain form with a right output and every input gradient scaled."""

  def form(*args, **kwargs):
    attend = functools.partial(plain.plain_attention, **kwargs)

    @jax.custom_vjp
    def run(*inputs):
      return attend(*inputs)

    def forward(*inputs):
      return jax.vjp(attend, *inputs)

    def backward(pullback, cotangent):
      return tuple((g.astype(jnp.float32) * scale).astype(g.dtype) for g in pullback(cotangent))

    run.defvjp(forward, backward)
    return run(*args)

  return form


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_the_gate_rejects_small_errors_and_keeps_the_correct_forms(dtype, monkeypatch):
  """In bfloat16 correct forms differ from each other by more than 1% of the largest value, so
  each form is held against a float32 evaluation: an output 1% off, 0.5% off in one head, or
  right with gradients 1% off is rejected; plain, rows and dense pass."""
  planted = {
    'off_1pct': _scaled_output(1.01),
    'one_head_off_half_pct': _scaled_output(1.005, head=1),
    'gradient_off_1pct': _scaled_gradient(1.01),
  }
  for name, form in planted.items():
    monkeypatch.setitem(choose.IMPLEMENTATIONS, name, form)
  layer = measure.Layer(
    batch=2,
    shape=choose.LayerShape(
      height=16,
      width=16,
      channels=32,
      qk_width=32,
      value_width=32,
      num_heads=4,
      block_size=4,
      halo_size=1,
      stride=1,
      mask_window=0,
      dtype=dtype,
    ),
  )
  correct = ('rows', 'dense')
  record = measure.measure_layer(layer, (*planted, *correct), timer=lambda compiled, args: 1.0)
  assert set(record['skipped']) == set(planted), record['skipped']
  assert all('disagrees with a float32 evaluation' in why for why in record['skipped'].values())
  assert set(record['seconds']) == {'plain', *correct}


def _cropped(layer: measure.Layer, blocks: int = 3) -> measure.Layer:
  """`layer` on a smaller map: `blocks` whole query blocks per side (an interior one among
  them) and the map's remainder against a block, so its edge blocks are padded and masked as at
  full size. The gate's errors are norms over the whole tensor (means of per-element roundings
  whose reductions, the window and the channels, are the layer's own): fewer blocks change their
  sampling noise only, which makes a false refusal more likely, not less."""
  span = layer.shape.block_size * layer.shape.stride
  size = {
    axis: min(n, blocks * span + n % span)
    for axis, n in (('height', layer.shape.height), ('width', layer.shape.width))
  }
  return measure.Layer(layer.batch, dataclasses.replace(layer.shape, **size))


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['h1', 'h7'])
def test_every_correct_form_passes_the_gate_on_every_h1_and_h7_layer(variant):
  """bfloat16, as TPU and GPU run them: no correct form is ever taken for a wrong one, on each
  distinct layer geometry of the variant (its channels, heads, block, halo, stride, and the
  remainder its map leaves against a block)."""
  config = named_configs.get_config(variant)
  config.model.dtype = 'bfloat16'
  layers = measure.model_layers(networks.create_model(config), config.image_size, 1)
  assert len(layers) == 7  # One per stage and stride of the variant: none is left out.
  for layer in map(_cropped, layers):
    record = measure.measure_layer(layer, ('rows', 'dense'), timer=lambda compiled, args: 1.0)
    assert record['skipped'] == {}, (layer.key(), record['skipped'], record['errors'])
