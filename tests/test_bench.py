"""Smoke test of bench/run.py on toy shapes: it runs and writes every field (no timing checks)."""

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_benchmark_writes_results(tmp_path):
  out = tmp_path / 'results.json'
  env = dict(os.environ, XLA_FLAGS='')  # The script sets its own threads; no fake devices.
  env['GLIBC_TUNABLES'] = 'glibc.malloc.hugetlb=0'  # glibc's default: recorded, changes nothing.
  subprocess.run([sys.executable, os.path.join(REPO, 'bench', 'run.py'), '--tiny', '--repeats', '1',
                  '--out', str(out)], check=True, cwd=REPO, env=env, timeout=300)
  results = json.loads(out.read_text())

  assert results['tiny'] is True
  assert results['machine']['threads'] >= 1
  assert results['machine']['glibc_tunables'] == 'glibc.malloc.hugetlb=0'
  assert set(results['matmul_peak_flops_per_s']) == {'float32', 'bfloat16'}
  train = results['train_step']
  assert set(train['images_per_s']) >= {'ours_float32', 'ours_bfloat16'}
  # Kernel time and page faults of each timed step, the VM's memory cost (see README).
  assert set(train['kernel_seconds']) == set(train['page_faults']) == set(train['images_per_s'])
  assert all(v >= 0 for v in train['kernel_seconds'].values())
  assert all(isinstance(v, int) and v >= 0 for v in train['page_faults'].values())
  # timm is optional (bench/requirements.txt): without it the JSON says why it was skipped.
  # Only look for timm: importing torch after TensorFlow (loaded by other tests) segfaults.
  if importlib.util.find_spec('timm') is None:
    assert 'not installed' in results['timm_skipped']
  assert train['timm_skipped']  # The tiny model is too small for timm's halonet_h1.
  assert results['train_step_speedup_vs_timm'] is None

  for dname in ('float32', 'bfloat16'):
    fractions = results[f'attention_fraction_of_matmul_peak_{dname}']
    assert set(fractions) == {'stage1', 'stage2_first'}
    assert all(f > 0 for f in fractions.values())
  assert set(results['attention_speedup_vs_timm']) == {'stage1', 'stage2_first'}
  for row in results['attention'].values():
    assert row['xla_flops'] > 0

  memory = results['memory']
  assert len(memory['rows']) == 2
  for row in memory['rows']:
    assert row['train_step_bytes']['total'] > 0
  for key in ('memory_growth_exponent', 'memory_growth_exponent_halo_attention',
              'memory_growth_exponent_global_attention'):
    assert isinstance(results[key], float)
