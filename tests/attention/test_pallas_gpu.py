"""The Pallas GPU (Triton) kernels beyond the per-layer reference tests in test_attention.py: the
geometries a key block meets, the train step on a data mesh, what a GPU receives (lowered, and
compiled by Triton and ptxas for Hopper and Ampere), refusals.

Compiling needs the `triton` package (torch's dependency, requirements-timm.txt); CI installs
it, and there its absence fails instead of skipping.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import chex
import jax
import pytest

from configs import tiny
from halonet import attention
from halonet import errors
from halonet import sharding
from tests import forms
from tests import hlo
from tests import load
from tests import steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRITON_CALL = forms.TRITON_CALL
KERNELS = [
  'halo_attention_gpu_backward_keys',
  'halo_attention_gpu_backward_queries',
  'halo_attention_gpu_backward_values',
  'halo_attention_gpu_forward',
]


@pytest.mark.parametrize(
  'block, halo, stride, width, value_width',
  [
    (8, 3, 1, 20, 8),  # H1's b and h: two query blocks reach each key block per axis.
    (2, 3, 1, 9, 8),  # h > b: four per axis.
    (10, 3, 1, 23, 8),  # b past a 16-wide tile's half: key tiles 16 wide, 10 kept.
    (12, 2, 2, 26, 8),  # strided, b = 12.
    (4, 1, 1, 9, 2 * 80),  # 80 value channels a head: two tiles of 64 (of 128, padded).
  ],
)
def test_key_block_geometries_match_the_plain_form(block, halo, stride, width, value_width):
  """The key kernel's visits (query blocks per key block, rows past the window, the last
  partial key block) and value channels split over programs, against the plain form: output,
  parameter and input gradients."""
  forms.assert_matches_plain_form(
    'pallas_gpu',
    (2, block + 3, width, 8),
    qk_width=8,
    value_width=value_width,
    num_heads=2,
    block_size=block,
    halo_size=halo,
    stride=stride,
  )


def test_data_parallel_train_step_equals_the_plain_path():
  """The real step on an 8-device data mesh: the kernels run per device under shard_map, only
  gradients and statistics are all-reduced, and the result is the plain form's."""
  results = {}
  mesh = sharding.create_mesh((8, 1))
  for impl in ('plain', 'pallas_gpu'):
    config = tiny.get_config()
    config.model.attention_impl = impl
    state, step = steps.fresh_state_and_step(config, mesh)
    batch = sharding.shard_batch(steps.random_batch(config, 0), mesh)
    compiled = step.lower(state, batch).compile()
    collectives = hlo.hlo_ops(compiled.as_text(), hlo.COLLECTIVES)
    assert {op for op, _ in collectives} == {'all-reduce'}, (impl, collectives)
    state, metrics = compiled(state, batch)
    results[impl] = jax.device_get(
      (metrics['loss'], metrics['grad_norm'], state.params, state.batch_stats)
    )
  chex.assert_trees_all_close(results['pallas_gpu'], results['plain'], rtol=1e-4, atol=1e-5)


def test_lowers_for_gpu_with_logits_and_windows_only_in_the_kernels():
  """What a GPU compiles: four Triton kernels and no loop; outside them no array is much larger
  than a projected map (the plain form's logits are 12x that)."""
  module = forms.h1_layer_fwd_bwd_lowered('pallas_gpu', 'cuda')
  kernels = re.findall(r'name = "(halo_attention_gpu_\w+)"', module)
  assert sorted(kernels) == KERNELS, kernels
  assert 'stablehlo.while' not in module
  one_map = 2 * 64 * 64 * 64  # batch x rows x columns x channels of q (and of k, v).
  # The column terms (24 per query, float32) and the padded head-major keys and values.
  assert hlo.largest_array_outside(module, TRITON_CALL) <= 1.5 * one_map
  plain = forms.h1_layer_fwd_bwd_lowered('plain', 'cuda')
  assert hlo.largest_array_outside(plain, TRITON_CALL) >= 10 * one_map  # The check can fail.


def test_triton_compiles_the_kernels_for_hopper_and_ampere_without_spills(tmp_path):
  """bench/gpu_aot.py, as a user runs it: Triton and ptxas compile each kernel of H1's first two
  layers for sm_90a and sm_80 within a GPU's registers and shared memory."""
  if importlib.util.find_spec('triton') is None:
    if os.environ.get('CI') == 'true':
      pytest.fail('triton is missing in CI: pip install -r requirements-timm.txt')
    pytest.skip('needs triton: pip install -r requirements-timm.txt')
  out = tmp_path / 'gpu_aot.json'
  subprocess.run(
    [sys.executable, 'bench/gpu_aot.py', '--tiny', '--batch=2', f'--out={out}'],
    cwd=ROOT,
    check=True,
    timeout=load.timeout(600),
    capture_output=True,
  )
  layers = json.loads(out.read_text())['layers']
  assert [layer['stride'] for layer in layers] == [1, 2]
  for layer in layers:
    assert sorted(layer['kernels']) == KERNELS
    for targets in layer['kernels'].values():
      assert sorted(targets) == ['sm_80', 'sm_90a']
      for figures in targets.values():
        assert 16 <= figures['registers'] <= 255, figures
        assert figures['spill_stores'] == figures['spill_loads'] == 0, figures
        assert 0 < figures['shared_bytes'] <= 163 * 1024, figures  # Ampere's most per block.


def test_runs_on_gpu_and_cpu_only():
  assert attention.resolve_impl('pallas_gpu', 'gpu') == 'pallas_gpu'
  assert attention.resolve_impl('pallas_gpu', 'cpu') == 'pallas_gpu'
  with pytest.raises(errors.ConfigError, match=r"'pallas_gpu' runs on GPU.*not on tpu.*'pallas'"):
    attention.resolve_impl('pallas_gpu', 'tpu')
  # And the TPU kernels' refusal on GPU points here.
  with pytest.raises(errors.ConfigError, match=r"not on gpu; use attention_impl='pallas_gpu'"):
    attention.resolve_impl('pallas', 'gpu')
