"""Compile-only figures of what a TPU or GPU runs (bfloat16; 'auto' as it resolves there).

- Arithmetic intensity of each distinct H1 and H7 attention layer, per implementation: forward +
  backward FLOPs over bytes accessed, from XLA's cost analysis. XLA counts a loop body once, so
  a looping implementation is costed on one row of query blocks of one image (a b-row input,
  where the loop runs once) and scaled by the layer's rows of blocks per image: every cost of
  the layer is per row of blocks.
- Memory of the H1 and H7 train steps per device batch, with and without per-block remat, from
  XLA's buffer plan (on a CPU host: labelled as such; run.py keeps XLA:CPU from undoing remat).
- Growth of memory with image size, and halo against global attention.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from halonet import sharding
from halonet.rounding import ceil_div
from halonet.train import step as train_step_lib

VARIANTS = ('h1', 'h7')
# The forms XLA compiles here. The Pallas kernels are interpreted on CPU (loops XLA costs once):
# their figures come from the TPU compiler, in bench/pallas.py.
XLA_IMPLEMENTATIONS = ('plain', 'rows')


def layer_cost(layer: dict[str, Any], impl: str, dtype: Any) -> dict[str, float]:
  """Forward + backward FLOPs, bytes accessed and their ratio of one layer on one image."""
  if impl == 'plain':
    compiled, scale = common.attention_fwd_bwd(layer, 1, dtype, impl)[0], 1
  else:
    compiled = common.attention_fwd_bwd(layer, 1, dtype, impl, height=layer['block_size'])[0]
    scale = ceil_div(layer['input'][0], layer['block_size'])  # Rows of blocks per image.
  cost = compiled.cost_analysis()
  flops, accessed = scale * cost['flops'], scale * cost['bytes accessed']
  return {'gflops': flops / 1e9, 'gbytes': accessed / 1e9, 'flops_per_byte': flops / accessed}


def arithmetic_intensity(tiny: bool) -> dict[str, list[dict[str, Any]]]:
  """Per variant, per distinct attention layer, per implementation: layer_cost in bfloat16.
  (`tiny`: H1 only, as the smoke test needs.)"""
  results = {}
  for variant in VARIANTS[:1] if tiny else VARIANTS:
    rows = []
    for layer in common.attention_layer_shapes(common.variant_config(variant, tiny=tiny), tiny):
      costs = {impl: layer_cost(layer, impl, jnp.bfloat16) for impl in XLA_IMPLEMENTATIONS}
      rows.append(
        {
          **{
            k: layer[k]
            for k in (
              'name',
              'input',
              'value_width',
              'num_heads',
              'block_size',
              'halo_size',
              'stride',
              'count',
            )
          },
          'costs': costs,
        }
      )
    results[variant] = rows
  return results


def train_step_bytes(variant: str, batch: int, remat: bool, tiny: bool) -> dict[str, int]:
  """Buffer plan of the real train step at this per-device batch, on one device."""
  config = common.variant_config(variant, tiny=tiny, **{'model.remat': remat, 'batch_size': batch})
  mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
  lowered, _ = train_step_lib.lower_train_step(config, mesh, backend='tpu')
  return common.compiled_bytes(lowered.compile())


def memory_per_device_batch(tiny: bool, batches: tuple[int, int] = (1, 8)) -> dict[str, Any]:
  """Train-step bytes at two per-device batches, with and without remat, and the per-image
  slope between them: what a per-device batch of B needs is about fixed + B * per_image.
  (`tiny`: H1 only.)"""
  results = {}
  for variant in VARIANTS[:1] if tiny else VARIANTS:
    for remat in (False, True):
      small, large = (train_step_bytes(variant, b, remat, tiny) for b in batches)
      per_image = (large['total'] - small['total']) / (batches[1] - batches[0])
      results[f'{variant}_remat' if remat else variant] = {
        'image_size': common.variant_config(variant, tiny=tiny).image_size,
        'batches': list(batches),
        'bytes': [small, large],
        'mib_per_image': per_image / 2**20,
        'fixed_mib': (small['total'] - batches[0] * per_image) / 2**20,
      }
  return results


def growth_exponent(pixels: list[int], values: list[float]) -> float:
  """Slope of log(value) against log(pixels): 1 is linear in pixel count, 2 quadratic."""
  return float(np.polyfit(np.log(pixels), np.log(values), 1)[0])


def memory_growth(tiny: bool, batch: int = 2) -> dict[str, Any]:
  """Temp bytes vs image size: the H1 train step, and stage-1 halo vs global attention layers.

  Global attention is the same layer with one block covering the whole map and no halo, so it
  differs from the halo layer only in neighbourhood size.
  """
  sizes = (32, 64) if tiny else (128, 256, 512)
  rows = []
  for size in sizes:
    config = common.variant_config('h1', tiny=tiny, image_size=size, batch_size=batch)
    lowered, _ = train_step_lib.lower_train_step(
      config, sharding.create_mesh((1, 1), jax.devices()[:1]), backend='tpu'
    )
    stage1 = {
      'input': [size // 4, size // 4, 64],
      'qk_width': 64,
      'value_width': 64,
      'num_heads': 4,
      'block_size': 8,
      'halo_size': 3,
      'stride': 1,
    }
    halo = common.attention_fwd_bwd(stage1, batch, jnp.bfloat16, 'plain')[0]
    whole = common.attention_fwd_bwd(
      stage1, batch, jnp.bfloat16, 'plain', block_size=size // 4, halo_size=0
    )[0]
    rows.append(
      {
        'image_size': size,
        'train_step_bytes': common.compiled_bytes(lowered.compile()),
        'stage1_halo_attention_bytes': common.compiled_bytes(halo),
        'stage1_global_attention_bytes': common.compiled_bytes(whole),
      }
    )
  pixels = [r['image_size'] ** 2 for r in rows]
  exponent = lambda key: growth_exponent(pixels, [r[key]['temp'] for r in rows])
  return {
    'batch': batch,
    'rows': rows,
    'exponent_train_step': exponent('train_step_bytes'),
    'exponent_halo_attention': exponent('stage1_halo_attention_bytes'),
    'exponent_global_attention': exponent('stage1_global_attention_bytes'),
  }


def format_results(results: dict[str, Any]) -> str:
  """The cost section as text tables."""
  lines = [
    'Attention fwd+bwd per image, bfloat16: GFLOP, GB accessed, FLOP/byte (XLA cost analysis)'
  ]
  impls = list(XLA_IMPLEMENTATIONS)
  for variant, rows in results['arithmetic_intensity'].items():
    lines.append(
      f'  {variant}: {"layer":14s} {"input":>14s} '
      + ' '.join(f'{impl + " GFLOP":>11s} {"GB":>6s} {"FLOP/B":>7s}' for impl in impls)
    )
    for r in rows:
      shape = 'x'.join(str(d) for d in r['input'])
      cells = ' '.join(
        f'{r["costs"][i]["gflops"]:11.3f} {r["costs"][i]["gbytes"]:6.3f} '
        f'{r["costs"][i]["flops_per_byte"]:7.1f}'
        for i in impls
      )
      lines.append(f'      {r["name"]:14s} {shape:>14s} {cells}')
  lines += [
    '',
    'Train step memory per device (XLA buffer plan; bfloat16, plain attention):',
    f'  {"":10s} {"px":>4s} {"MiB/image":>10s} {"fixed MiB":>10s}',
  ]
  for name, r in results['memory_per_device_batch'].items():
    lines.append(
      f'  {name:10s} {r["image_size"]:4d} {r["mib_per_image"]:10.1f} {r["fixed_mib"]:10.1f}'
    )
  growth = results['memory_growth']
  lines += [
    '',
    f'Memory (MiB, temp + argument + output) vs image size, batch {growth["batch"]}:',
    f'  {"px":>4s} {"H1 step":>9s} {"halo attn":>10s} {"global attn":>12s}',
  ]
  for r in growth['rows']:
    mib = lambda key: r[key]['total'] / 2**20
    lines.append(
      f'  {r["image_size"]:4d} {mib("train_step_bytes"):9.1f} '
      f'{mib("stage1_halo_attention_bytes"):10.1f} '
      f'{mib("stage1_global_attention_bytes"):12.1f}'
    )
  lines.append(
    f'  growth exponent of temp bytes in pixel count: H1 step '
    f'{growth["exponent_train_step"]:.2f}, halo layer '
    f'{growth["exponent_halo_attention"]:.2f}, global layer '
    f'{growth["exponent_global_attention"]:.2f}'
  )
  return '\n'.join(lines)
