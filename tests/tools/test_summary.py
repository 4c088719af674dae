"""The summary command: the paper's neighbourhood range and FLOPs that scale with pixels."""

import json
import os
import subprocess
import sys

from configs import halonet as named_configs
from configs import tiny
from halonet.tools import variants as summary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_neighbourhoods_span_the_papers_range():
  # The paper: neighbourhoods range from 14x14 (b=8, h=3) to 18x18 (b=14, h=2).
  assert summary.neighbourhood(named_configs.get_config('h0')).startswith('14x14 (b=8, h=3)')
  assert summary.neighbourhood(named_configs.get_config('h5')).startswith('18x18 (b=14, h=2)')
  config = tiny.get_config()
  config.model.conv_stages = (1, 2, 3, 4)
  assert summary.neighbourhood(config) == 'none (all conv)'


def test_flops_are_linear_in_pixel_count():
  """Every cost here (blocks of b x b queries, convolutions) is proportional to the pixels.

  So doubling the side quadruples the FLOPs (global attention would give 16x). Stage 1 attends
  over rows of blocks that a loop visits; XLA's cost analysis counts a loop body once, and a
  summary that counted one row would fall short of 4x.
  """

  def config(image_size):
    c = tiny.get_config()
    c.image_size = image_size
    c.model.widths, c.model.num_heads = (64, 16, 16, 16), (4, 2, 2, 2)
    c.model.block_size, c.model.halo_size = 8, 3
    c.model.conv_stages = (2, 3, 4)  # Attention dominates: stage 1 on 32 x 32 and 64 x 64 maps.
    return c

  ratio = summary.gflops_per_image(config(256)) / summary.gflops_per_image(config(128))
  assert 3.95 < ratio < 4.05


def test_json_lists_all_variants_and_the_extra_config():
  done = subprocess.run(
    [sys.executable, 'summary.py', '--json', '--config=configs/tiny.py'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  # What is under way, one line per config before its minute of counting, and no library
  # chatter (e.g. JAX looking for a TPU); stdout stays the JSON alone.
  names = [f'h{i}' for i in range(8)] + ['tiny']
  assert done.stderr.splitlines() == [
    f'counting the parameters and FLOPs of {name}...' for name in names
  ]
  rows = json.loads(done.stdout)
  assert [r['variant'] for r in rows] == [f'h{i}' for i in range(8)] + ['tiny']
  paper = {
    'h0': 5.5,
    'h1': 8.1,
    'h2': 9.4,
    'h3': 12.3,
    'h4': 19.1,
    'h5': 30.7,
    'h6': 43.4,
    'h7': 67.0,
  }
  for r in rows[:8]:
    assert r['paper_params_m'] == paper[r['variant']]
    assert abs(r['params_m'] - paper[r['variant']]) / paper[r['variant']] < (
      0.04 if r['variant'] == 'h3' else 0.01
    )
    assert r['gflops'] > 1
  assert rows[8]['paper_params_m'] is None
