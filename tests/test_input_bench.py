"""Smoke test of bench/input_pipeline.py on a handful of images: every variant runs and the JSON
holds its rates and ratios (no timing is checked)."""

import json
import os
import subprocess
import sys

from tests import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_input_benchmark_writes_every_variant(tmp_path):
  out = tmp_path / 'results.json'
  command = [
    sys.executable,
    os.path.join(ROOT, 'bench', 'input_pipeline.py'),
    '--images=32',
    '--size=64',
    '--rounds=1',
    '--seconds=0.5',
    f'--out={out}',
  ]
  subprocess.run(command, check=True, cwd=ROOT, timeout=load.timeout(600), capture_output=True)
  results = json.loads(out.read_text())
  rates = results['images_per_second_per_core']
  assert set(rates) == {
    'bare_decode_crop_resize',
    'pipeline_no_randaugment',
    'pipeline_randaugment_2_10',
  }
  assert all(rate > 0 for rate in rates.values())
  assert results['randaugment_vs_bare'] > 0 and results['no_randaugment_vs_bare'] > 0
  assert results['image_size'] == 64
