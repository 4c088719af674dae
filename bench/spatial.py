"""What spatial partitioning saves per device, compile-only, on 8 CPU devices standing in for 8
accelerators (the train step as a TPU compiles it: bfloat16, plain attention, H7 with remat):

    python bench/spatial.py                # H7 at 600 px: ~4 min on 2 CPU cores
    python bench/spatial.py --tiny         # H7's shape at 64 px: the smoke test

Compares one image per device (mesh (8, 1), batch 8) with half an image per device (mesh (4, 2),
batch 4: each image's rows split over 2 devices): per-device FLOPs and temporary memory from
XLA's cost analysis and buffer plan, and the collectives each step moves (no all-gather; the
collective-permutes are the border rows of convolutions, pooling and halo attention).
"""

import argparse
import json
import os
import re
import sys

os.environ['XLA_FLAGS'] = ' '.join(
  [
    os.environ.get('XLA_FLAGS', ''),
    '--xla_force_host_platform_device_count=8',
    '--xla_disable_hlo_passes=cse_barrier_expander',
  ]
).strip()  # Keeps remat (see run.py).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax

from bench import common
from halonet import sharding
from halonet.train import step as train_step_lib

MESHES = {'one image per device': ((8, 1), 8), 'half an image per device': ((4, 2), 4)}


def compare(tiny: bool) -> dict[str, dict[str, float]]:
  """Per mesh: per-device GFLOP, temp MiB, and collective counts of the H7 train step."""
  results = {}
  for name, (mesh_shape, batch) in MESHES.items():
    # The tiny image is even, so that its rows split over 2 devices.
    config = common.variant_config(
      'h7', tiny=tiny, batch_size=batch, **({'image_size': 64} if tiny else {})
    )
    mesh = sharding.create_mesh(mesh_shape, jax.devices()[:8])
    compiled = train_step_lib.lower_train_step(config, mesh, backend='tpu')[0].compile()
    hlo = compiled.as_text()
    results[name] = {
      'mesh_shape': list(mesh_shape),
      'global_batch': batch,
      'image_size': config.image_size,
      'gflops_per_device': compiled.cost_analysis()['flops'] / 1e9,
      'temp_mib_per_device': compiled.memory_analysis().temp_size_in_bytes / 2**20,
      **{
        op: len(re.findall(rf'\s{op}(?:-start)?\(', hlo))
        for op in ('all-gather', 'all-reduce', 'collective-permute')
      },
    }
  one, half = results.values()
  results['ratios'] = {
    key: half[key] / one[key] for key in ('gflops_per_device', 'temp_mib_per_device')
  }
  return results


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--tiny', action='store_true', help='toy shapes: a smoke test')
  parser.add_argument(
    '--out', default=os.path.join(os.path.dirname(__file__), 'results_spatial.json')
  )
  args = parser.parse_args()
  results = compare(args.tiny)
  for name, r in results.items():
    print(f'{name}: {json.dumps(r)}')
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
