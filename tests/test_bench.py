"""Smoke test of bench/run.py on toy shapes: every section runs and writes its fields (no timing
checks; the accelerator section is forced onto the CPU); the reader of TPU schedules."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bench import tpu_aot
from tests import compile_flags
from tests import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_benchmark_writes_results(tmp_path):
  out = tmp_path / 'results.json'
  # The script sets its own threads; no fake devices. No figure is checked: its many steps
  # compile fast.
  env = dict(os.environ, XLA_FLAGS=compile_flags.FAST_COMPILE)
  env['GLIBC_TUNABLES'] = 'glibc.malloc.hugetlb=0'  # glibc's default: recorded, changes nothing.
  subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, 'bench', 'run.py'),
      '--tiny',
      '--repeats',
      '1',
      '--sections',
      'cpu,accelerator,costs',
      '--out',
      str(out),
    ],
    check=True,
    cwd=REPO,
    env=env,
    timeout=load.timeout(600),
  )
  results = json.loads(out.read_text())

  assert results['tiny'] is True
  assert results['sections'] == ['cpu', 'accelerator', 'costs']
  assert results['machine']['threads'] >= 1
  assert results['machine']['glibc_tunables'] == 'glibc.malloc.hugetlb=0'

  cpu = results['cpu']
  assert set(cpu['matmul_peak_flops_per_s']) == {'float32', 'bfloat16'}
  train = cpu['train_step']
  assert set(train['images_per_s']) >= {'ours_float32', 'ours_float32_plain', 'ours_bfloat16'}
  # Kernel time and page faults of each timed step, the VM's memory cost (see README).
  assert set(train['kernel_seconds']) == set(train['page_faults']) == set(train['images_per_s'])
  assert all(v >= 0 for v in train['kernel_seconds'].values())
  assert all(isinstance(v, int) and v >= 0 for v in train['page_faults'].values())
  assert results['train_step_auto_vs_plain'] > 0
  # timm is optional (bench/requirements.txt): without it the JSON says why it was skipped.
  # Only look for timm: importing torch after TensorFlow (loaded by other tests) segfaults.
  if importlib.util.find_spec('timm') is None:
    assert 'not installed' in results['timm_skipped']
  assert train['timm_skipped']  # The tiny model is too small for timm's halonet_h1.
  assert results['train_step_speedup_vs_timm'] is None
  # The layers are read off the model: tiny H1's stride-1 stage 1 and strided stage 2.
  assert list(cpu['attention']) == ['stage1_block0', 'stage2_block0']
  assert [r['stride'] for r in cpu['attention'].values()] == [1, 2]
  for dname in ('float32', 'bfloat16'):
    fractions = results[f'attention_fraction_of_matmul_peak_{dname}']
    assert set(fractions) == {'stage1_block0', 'stage2_block0'}
    assert all(f > 0 for f in fractions.values())

  steps = results['accelerator']['steps']
  assert set(steps) == {'ours_h1', 'ours_h1_auto'}
  for step in steps.values():
    assert step['images_per_s'] > 0 and 0 < step['mfu_vs_matmul_peak']
  # Every distinct layer of tiny H1 (one block per stage: stride 1, then 2, 2, 2) with this
  # backend's forms timed and the fastest kept.
  layers = results['accelerator']['attention']['h1']
  assert [record['layer']['stride'] for record in layers.values()] == [1, 2, 2, 2]
  for record in layers.values():
    assert set(record['seconds']) == {'plain', 'rows'} and record['skipped'] == {}
    assert record['choice'] == min(record['seconds'], key=record['seconds'].get)
  assert results['accelerator_attention_choice']['h1'] == {
    key: record['choice'] for key, record in layers.items()
  }

  intensity = results['attention_flops_per_byte']
  assert set(intensity) == {'h1'}  # --tiny: H1 only.
  for layers in intensity.values():
    assert len(layers) == 2
    for impls in layers.values():
      assert set(impls) == {'plain', 'rows'} and all(v > 0 for v in impls.values())
  per_image = results['train_step_mib_per_image']
  assert set(per_image) == {'h1', 'h1_remat'} and all(v > 0 for v in per_image.values())
  # Remat keeps only block inputs (the bench keeps XLA:CPU from undoing it: see run.py).
  assert per_image['h1_remat'] < 0.7 * per_image['h1']
  growth = results['costs']['memory_growth']
  assert len(growth['rows']) == 2
  for key in (
    'memory_growth_exponent',
    'memory_growth_exponent_halo_attention',
    'memory_growth_exponent_global_attention',
  ):
    assert isinstance(results[key], float)
  # Global attention's temp memory grows faster with pixels than halo attention's.
  assert (
    results['memory_growth_exponent_global_attention']
    > results['memory_growth_exponent_halo_attention']
  )


def test_static_cycles_multiplies_bundles_by_enclosing_trip_counts():
  listing = '\n'.join(
    [
      '     0   :  { %1 = sst [smem:[#a]] %s0 }',
      '   0x1 LB: > { %2 = sadd.s32 1, %s1 }',
      '   0x2 LB: >> { %3 = vadd.f32 %v1, %v2 }',
      '   0x3   : >> { %p4 = scmp.ge.s32.totalorder %s5, 8 /* loop exit test */ }',
      '   0x4   : > { %p6 = scmp.ge.s32.totalorder %s7, 66 /* loop exit test */ }',
      '   0x5   :  { %8 = vsyncpa [#b], 0 }',
    ]
  )
  assert tpu_aot.static_cycles(listing) == {
    'bundles': 6,
    'cycles': 1 + 66 * (2 + 8 * 2) + 1,
    'loops': 2,
  }
