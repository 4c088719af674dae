"""The summary command: the paper's neighbourhood range and FLOPs that scale with pixels."""

import json
import os
import subprocess
import sys

from configs import base, tiny
from halonet import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_neighbourhoods_span_the_papers_range():
  # The paper: neighbourhoods range from 14x14 (b=8, h=3) to 18x18 (b=14, h=2).
  assert summary.neighbourhood(base.variant_config('h0')).startswith('14x14 (b=8, h=3)')
  assert summary.neighbourhood(base.variant_config('h5')).startswith('18x18 (b=14, h=2)')
  config = tiny.get_config()
  config.model.conv_stages = (1, 2, 3, 4)
  assert summary.neighbourhood(config) == 'none (all conv)'


def test_flops_grow_with_pixel_count():
  small = tiny.get_config()
  large = tiny.get_config()
  large.image_size = 2 * small.image_size
  ratio = summary.gflops_per_image(large) / summary.gflops_per_image(small)
  assert 3.0 < ratio < 4.5  # Local attention: roughly linear in pixels (4x), unlike global (16x).


def test_json_lists_all_variants_and_the_extra_config():
  out = subprocess.run(
      [sys.executable, '-m', 'halonet.summary', '--json', '--config=configs/tiny.py'],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  rows = json.loads(out)
  assert [r['variant'] for r in rows] == [f'h{i}' for i in range(8)] + ['tiny']
  paper = {'h0': 5.5, 'h1': 8.1, 'h2': 9.4, 'h3': 12.3, 'h4': 19.1, 'h5': 30.7, 'h6': 43.4,
           'h7': 67.0}
  for r in rows[:8]:
    assert r['paper_params_m'] == paper[r['variant']]
    assert abs(r['params_m'] - paper[r['variant']]) / paper[r['variant']] < (0.04 if r['variant'] == 'h3' else 0.01)
    assert r['gflops'] > 1
  assert rows[8]['paper_params_m'] is None
