"""The fused Pallas halo attention against the plain path, as a TPU compiles and runs them.

    python bench/pallas.py          # any host, compile only (libtpu): bench/results_pallas.json
    python bench/pallas.py --tiny --out /tmp/p.json   # 2 layers each, no train steps: smoke test
    python bench/pallas.py --check       # on a TPU host: both paths' numerics and measured times

Compile-only figures (XLA's TPU compiler through libtpu, `bench/tpu_aot.py`; nothing runs), per
distinct H1 and H7 attention layer, forward + backward, bfloat16, --batch images:
  - flops: the plain program's (XLA's count of the work the layer needs; the kernels issue more,
    as each head contracts every lane of its head group: `pallas_program_gflops`);
  - bytes: XLA's count of bytes accessed of each compiled program; for the kernels XLA takes
    what they declare, `attention_pallas.hbm_bytes`: each block spec's block bytes times the
    number of times the grid changes its block index (Pallas copies a block only then);
  - temp memory of the compiled program (HBM per device);
  - an estimate of time, not a measurement: the plain path at least moves its bytes at the
    chip's HBM bandwidth; each kernel needs at least its static schedule (bundles times loop trip
    counts, one cycle each, at the chip's clock), here added to all bytes at full bandwidth.
Train steps (without --tiny): temp memory of the H1 and H7 steps per device with each path.

--check (a TPU host): for each layer, the largest difference between the paths' outputs and
gradients relative to the plain path's largest value, and each path's measured forward +
backward time; the H1 train step's images/s on one chip with each path (--batch images).
"""

import argparse
import json
import os
import sys

_parser = argparse.ArgumentParser(
  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
_parser.add_argument(
  '--tiny',
  action='store_true',
  help="each variant's first two layers, no train steps: a smoke test",
)
_parser.add_argument('--variants', default='h1,h7', help='comma-separated paper variants')
_parser.add_argument(
  '--layers',
  type=int,
  default=0,
  help="only each variant's first N distinct attention layers (0: all)",
)
_parser.add_argument('--check', action='store_true', help='run both paths on this host (a TPU)')
_parser.add_argument('--chip', default='v5e', help='compile-only target: v5e, v6e or v5p')
_parser.add_argument('--batch', type=int, default=8, help='images per layer call')
_parser.add_argument('--repeats', type=int, default=5, help='--check: timed runs per figure')
_parser.add_argument(
  '--out', default=os.path.join(os.path.dirname(__file__), 'results_pallas.json')
)
ARGS = _parser.parse_args()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import tpu_aot  # noqa: E402  (imports no jax)

DUMP = None if ARGS.check else tpu_aot.configure()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from halonet import attention  # noqa: E402
from halonet import sharding  # noqa: E402

IMPLS = ('plain', 'pallas')
KERNELS = ('halo_attention_forward', 'halo_attention_backward')
TRAIN_STEPS = (('h1', 16), ('h1', 32), ('h7', 4))  # (variant, per-device batch)


def layer_shapes(variant: str) -> list[dict]:
  """The variant's distinct attention layers, as many as --tiny and --layers ask for."""
  layers = common.attention_layer_shapes(common.variant_config(variant), tiny=ARGS.tiny)
  return layers[: ARGS.layers or None]


def layer_fn(layer: dict, impl: str):
  """Forward + backward of one attention layer: (params, x) -> (grads, output)."""
  fields = {
    k: layer[k]
    for k in ('qk_width', 'value_width', 'num_heads', 'block_size', 'halo_size', 'stride')
  }
  net = attention.HaloAttention(
    **fields, attention=attention.AttentionPlan(impl), dtype=jnp.bfloat16
  )
  loss = lambda p, x: net.apply({'params': p}, x).astype(jnp.float32).sum()
  return net, jax.value_and_grad(loss, argnums=(0, 1))


def layer_inputs(layer: dict, net, batch: int, place):
  x = jax.ShapeDtypeStruct((batch, *layer['input']), jnp.bfloat16)
  params = jax.eval_shape(net.init, jax.random.key(1), x)['params']
  return place(params), place(x)


def compiled_layer(layer: dict, impl: str, batch: int, device) -> dict:
  """compile_stats (and the kernels' static schedules) of one layer on the target chip."""
  net, fn = layer_fn(layer, impl)
  on = NamedSharding(Mesh(np.array([device]), ('x',)), P())
  place = lambda tree: jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), tree
  )
  lowered = jax.jit(fn).lower(*layer_inputs(layer, net, batch, place))
  stats = tpu_aot.compile_stats(lowered, DUMP)
  if impl == 'pallas':
    stats['kernels'] = tpu_aot.kernel_schedules(DUMP, KERNELS)
  return stats


def estimate(stats: dict, impl: str, chip: dict) -> float:
  """Seconds (see the module docstring): bytes at HBM bandwidth, plus the kernels' cycles."""
  seconds = stats['bytes_accessed'] / chip['hbm_bytes_per_s']
  if impl == 'pallas':
    seconds += sum(k['cycles'] for k in stats['kernels'].values()) / chip['clock_hz']
  return seconds


def compile_only() -> dict:
  chip = tpu_aot.CHIPS[ARGS.chip]
  device = tpu_aot.device(ARGS.chip)
  results = {
    'chip': ARGS.chip,
    'chip_figures': chip,
    'batch': ARGS.batch,
    'layers': {},
    'train_steps': {},
  }
  for variant in ARGS.variants.split(','):
    rows = []
    for layer in layer_shapes(variant):
      row = {
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
      }
      stats = {impl: compiled_layer(layer, impl, ARGS.batch, device) for impl in IMPLS}
      plain, fused = stats['plain'], stats['pallas']
      flops = plain['flops']
      row.update(
        {
          'gflops': flops / 1e9,
          'pallas_program_gflops': fused['flops'] / 1e9,
          'gbytes': {i: stats[i]['bytes_accessed'] / 1e9 for i in IMPLS},
          'flops_per_byte': {i: flops / stats[i]['bytes_accessed'] for i in IMPLS},
          'temp_mib': {i: stats[i]['temp_bytes'] / 2**20 for i in IMPLS},
          'kernel_cycles': {k: v['cycles'] for k, v in fused['kernels'].items()},
          'estimated_ms': {i: 1e3 * estimate(stats[i], i, chip) for i in IMPLS},
        }
      )
      row['intensity_ratio'] = row['flops_per_byte']['pallas'] / row['flops_per_byte']['plain']
      row['estimated_speedup'] = row['estimated_ms']['plain'] / row['estimated_ms']['pallas']
      rows.append(row)
      print(format_layer(variant, row), flush=True)
    results['layers'][variant] = rows
  if not ARGS.tiny:
    for variant, batch in TRAIN_STEPS:
      results['train_steps'][f'{variant}_batch{batch}'] = {
        impl: train_step_memory(variant, impl, batch, device) for impl in IMPLS
      }
      print(variant, batch, results['train_steps'][f'{variant}_batch{batch}'], flush=True)
  return results


def train_step_memory(variant: str, impl: str, batch: int, device) -> dict:
  """Temp memory of the real train step per device, or the compiler's out-of-memory verdict."""
  # pylint: disable=g-import-not-at-top  # Imports TensorFlow (the input pipeline's): --tiny
  # compiles layers only and needs none of it.
  from halonet.train import step as train_step_lib

  config = common.variant_config(variant, batch_size=batch, **{'model.attention_impl': impl})
  lowered, _ = train_step_lib.lower_train_step(
    config, sharding.create_mesh((1, 1), [device]), backend='tpu'
  )
  try:
    stats = tpu_aot.compile_stats(lowered, DUMP)
  except jax.errors.JaxRuntimeError as e:  # The compiler refuses a step that does not fit HBM.
    return {'fits': False, 'error': str(e).splitlines()[0][:300]}
  return {
    'fits': True,
    'temp_gib': stats['temp_bytes'] / 2**30,
    'gbytes_accessed': stats['bytes_accessed'] / 1e9,
  }


def format_layer(variant: str, r: dict) -> str:
  shape = 'x'.join(map(str, r['input']))
  return (
    f'{variant} {r["name"]:14s} {shape:>10s} s={r["stride"]}  {r["gflops"]:6.2f} GFLOP  '
    f'GB {r["gbytes"]["plain"]:7.3f} -> {r["gbytes"]["pallas"]:6.3f}  FLOP/B '
    f'{r["flops_per_byte"]["plain"]:5.1f} -> {r["flops_per_byte"]["pallas"]:6.1f} '
    f'({r["intensity_ratio"]:4.1f}x)  temp MiB {r["temp_mib"]["plain"]:7.1f} -> '
    f'{r["temp_mib"]["pallas"]:5.1f}  est. ms {r["estimated_ms"]["plain"]:6.3f} -> '
    f'{r["estimated_ms"]["pallas"]:6.3f} ({r["estimated_speedup"]:4.1f}x)'
  )


def check() -> dict:
  """Both paths on this host's devices: numerics and measured times."""
  results = {
    'backend': jax.default_backend(),
    'devices': [str(d) for d in jax.devices()],
    'batch': ARGS.batch,
    'layers': {},
    'train_steps': {},
  }
  for variant in ARGS.variants.split(','):
    rows = []
    for layer in layer_shapes(variant):
      outputs, calls = {}, {}
      for impl in IMPLS:
        net, fn = layer_fn(layer, impl)
        x = jax.random.normal(jax.random.key(0), (ARGS.batch, *layer['input']), jnp.bfloat16)
        params = net.init(jax.random.key(1), x)['params']
        compiled = jax.jit(fn).lower(params, x).compile()
        outputs[impl] = compiled(params, x)
        calls[impl] = lambda c=compiled, a=(params, x): jax.block_until_ready(c(*a))
      scale = jax.tree.map(lambda a: float(jnp.abs(a.astype(jnp.float32)).max()), outputs['plain'])
      error = jax.tree.map(
        lambda a, b, s: (
          float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()) / max(s, 1e-30)
        ),
        outputs['plain'],
        outputs['pallas'],
        scale,
      )
      seconds = common.seconds_of(common.best_of(calls, ARGS.repeats))
      rows.append(
        {
          'name': layer['name'],
          'input': layer['input'],
          'max_relative_difference': max(jax.tree_util.tree_leaves(error)),
          'ms': {i: 1e3 * seconds[i] for i in IMPLS},
          'speedup': seconds['plain'] / seconds['pallas'],
        }
      )
      print(variant, rows[-1], flush=True)
    results['layers'][variant] = rows
  if not ARGS.tiny:  # One chip, --batch images.
    batch = ARGS.batch
    steps = {
      impl: common.timed_train_step(
        common.variant_config('h1', **{'model.attention_impl': impl, 'model.dtype': 'bfloat16'}),
        batch,
      )
      for impl in IMPLS
    }
    seconds = common.seconds_of(common.best_of(steps, ARGS.repeats))
    results['train_steps']['h1'] = {
      'batch': batch,
      **{f'{impl}_images_per_s': batch / seconds[impl] for impl in IMPLS},
    }
    print(results['train_steps'], flush=True)
  return results


def main():
  results = check() if ARGS.check else compile_only()
  results['jax'] = jax.__version__
  with open(ARGS.out, 'w') as f:
    json.dump(results, f, indent=1)
  print('wrote', ARGS.out)


if __name__ == '__main__':
  main()
