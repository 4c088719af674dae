"""The fused Pallas kernels beyond the per-layer reference tests in test_attention.py: the whole
train step, what a TPU receives (lowered and compiled), the HBM traffic they declare, refusals.

Compiling for a TPU needs libtpu (bench/pallas.py says where and how to install it); CI
installs it, and there a missing libtpu fails instead of skipping.
"""

import json
import os
import re
import subprocess
import sys

import chex
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import pytest

from configs import tiny
from halonet import attention
from halonet import errors
from halonet import sharding
from halonet.attention import pallas as attention_pallas
from halonet.attention import pallas_kernels as attention_pallas_kernels
from halonet.models import networks
from halonet.train import step as train_step_lib
from tests import forms
from tests import hlo
from tests import load
from tests import steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize('mesh_shape', [(8, 1), (4, 2)])
def test_train_step_equals_the_plain_paths(mesh_shape):
  """The real step (forward, backward, update) on a data mesh and on a (data, spatial) mesh: the
  kernels run per device under shard_map, and the result is the plain form's."""
  results = {}
  for impl in ('plain', 'pallas'):
    config = tiny.get_config()
    config.model.attention_impl = impl
    mesh = sharding.create_mesh(mesh_shape)
    state, step = steps.fresh_state_and_step(config, mesh)
    state, metrics = step(state, sharding.shard_batch(steps.random_batch(config, 0), mesh))
    results[impl] = jax.device_get(
      (metrics['loss'], metrics['grad_norm'], state.params, state.batch_stats)
    )
  chex.assert_trees_all_close(results['pallas'], results['plain'], rtol=1e-4, atol=1e-5)


def test_data_parallel_step_only_all_reduces_parameters():
  """Under a data mesh each device runs the kernels on its own images: nothing is gathered."""
  config = tiny.get_config()
  config.batch_size = 64
  config.model.attention_impl = 'pallas'
  lowered, _ = train_step_lib.lower_train_step(config, sharding.create_mesh((8, 1)))
  collectives = hlo.hlo_ops(lowered.compile().as_text(), hlo.COLLECTIVES)
  assert {op for op, _ in collectives} == {'all-reduce'}, collectives


# Block sizes of every alignment period (8 / gcd(b, 8) blocks per group: 8, 4, 2, 1), on maps
# wide enough for a whole group of unaligned windows plus a partial one.
@pytest.mark.parametrize(
  'block, halo, stride, width',
  [(3, 1, 1, 29), (6, 2, 2, 32), (10, 3, 1, 52), (12, 2, 2, 40), (8, 3, 1, 20)],
)
def test_every_window_alignment_matches_the_plain_form(block, halo, stride, width):
  forms.assert_matches_plain_form(
    'pallas',
    (2, block + 3, width, 8),
    qk_width=8,
    value_width=8,
    num_heads=2,
    block_size=block,
    halo_size=halo,
    stride=stride,
  )


# Heads in lane-tile groups (KernelShape.head_groups): 2 heads of 64 lanes per group and one
# head of 128 per group; 4 of 32 and all 8 heads of 16 in one; one of 128, and 2 of 48 that
# straddle a tile (one group).
@pytest.mark.parametrize(
  'heads, qk_width, value_width', [(4, 256, 512), (8, 256, 128), (2, 256, 96)]
)
def test_head_groups_match_the_plain_form(heads, qk_width, value_width):
  forms.assert_matches_plain_form(
    'pallas',
    (2, 8, 11, 16),
    qk_width=qk_width,
    value_width=value_width,
    num_heads=heads,
    block_size=4,
    halo_size=1,
  )


def _double(x_ref, o_ref):
  o_ref[...] = 2 * x_ref[...]


def _race_reports(capsys: pytest.CaptureFixture[str]) -> int:
  """How many races Pallas' interpreter has printed since the last call."""
  return capsys.readouterr().out.count('RACE DETECTED')


def test_kernels_are_race_free_on_two_cores(monkeypatch, capsys):
  """Pallas' TPU interpreter on two simulated cores (the images split between them, as a
  megacore's 'parallel' axis is) reports no race between any reads and writes of the kernels,
  while it does report one in a control kernel whose two cores write the same block."""
  two_cores = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  racy = pl.pallas_call(
    _double,
    grid=(2,),
    in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
    out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),  # Both cores: the one output block.
    out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
    compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',)),
    interpret=two_cores,
  )
  _race_reports(capsys)
  jax.block_until_ready(racy(jnp.ones((16, 128), jnp.float32)))
  assert _race_reports(capsys) > 0  # The detector runs and reports what it finds.

  monkeypatch.setattr(attention_pallas, 'INTERPRET', two_cores)
  layer = attention.HaloAttention(
    qk_width=8,
    value_width=8,
    num_heads=2,
    block_size=4,
    halo_size=1,
    stride=2,
    mask_window=3,
    attention=attention.AttentionPlan('pallas'),
  )
  x = jax.random.normal(jax.random.key(0), (2, 10, 7, 6))
  variables = layer.init(jax.random.key(1), x)
  grads = jax.jit(jax.grad(lambda v, x: layer.apply(v, x).sum(), argnums=(0, 1)))(variables, x)
  jax.block_until_ready(grads)
  assert _race_reports(capsys) == 0


def test_refused_on_gpu_in_one_line():
  config = tiny.get_config()
  config.model.attention_impl = 'pallas'
  with pytest.raises(errors.ConfigError, match=r"attention_impl='pallas' runs on TPU.*not on gpu"):
    networks.create_model(config, backend='gpu')
  assert networks.create_model(config, backend='tpu').attention.default == 'pallas'


def test_lowers_for_tpu_with_logits_and_windows_only_in_the_kernels():
  """What a TPU compiles: two Mosaic kernels and no loop; outside them no array is much larger
  than a projected map (the plain form's logits are 12x that, its windows 3x)."""
  module = forms.h1_layer_fwd_bwd_lowered('pallas', 'tpu')
  kernels = re.findall(r'kernel_name = "(halo_attention_\w+)"', module)
  assert sorted(set(kernels)) == ['halo_attention_backward', 'halo_attention_forward'], kernels
  assert 'stablehlo.while' not in module
  one_map = 2 * 64 * 64 * 64  # batch x rows x columns x channels of q (and of k, v).
  assert hlo.largest_array_outside(module, 'tpu_custom_call') <= 1.5 * one_map  # k, v padded by h.
  plain = forms.h1_layer_fwd_bwd_lowered('plain', 'tpu')
  assert hlo.largest_array_outside(plain, 'tpu_custom_call') >= 10 * one_map  # The check can fail.


def test_hbm_bytes_counts_tiles_once_per_block_change():
  """hbm_bytes against a count by hand: 2 images of 3 x 2 blocks (b=4, h=1), 2 heads of 8
  channels, bfloat16 (16-row tiles), 16 queries per block."""
  bf16, f32 = jnp.bfloat16, jnp.float32
  s = lambda shape, dtype=bf16: jax.ShapeDtypeStruct(shape, dtype)
  # Windows are 6 rows x 16 columns (6 widened to the tile): 96 keys; tables 2 x 4 x 6 rows.
  q, k, v = s((2, 3, 2, 16, 16)), s((2, 14, 20, 16)), s((2, 14, 20, 16))
  tables = (s((48, 16)), s((16, 48), f32), s((48, 96)), s((3, 16, 96), f32), s((2, 16, 96), f32))
  shape = attention_pallas_kernels.KernelShape.of(4, 2, q, k, v, tables[0])
  lanes = 128  # Every last dimension here pads to one 128-lane tile.
  q_block = 2 * 16 * lanes * 2  # A row's 2 blocks of 16 queries, bytes.
  strip = 6 * 32 * lanes * 2  # 6 map rows of 20 columns (-> 32 rows of the tile).
  resident = (
    48 * lanes * 2 + 16 * lanes * 4 + 48 * lanes * 2 + 3 * 16 * lanes * 4 + 2 * 16 * lanes * 4
  )
  steps = 2 * 3  # Every step moves to a new (image, block row).
  forward = steps * (q_block + 2 * strip) + resident + steps * q_block
  assert (
    attention_pallas.hbm_bytes(
      attention_pallas.forward_call(shape, q, k, v, tables), [q, k, v, *tables]
    )
    == forward
  )
  # Backward: 4 steps per image (bands of 4 rows cover 14 map rows); the last reads nothing new.
  band = 4 * 32 * lanes * 2
  backward = (
    steps * (3 * q_block + 2 * strip)
    + resident  # q, out, d_out; k, v strips.
    + steps * q_block
    + 2 * 4 * 2 * band  # d_q; d_k, d_v bands.
    + 2 * 48 * lanes * 4
  )  # d_tables, one per image.
  assert (
    attention_pallas.hbm_bytes(
      attention_pallas.backward_call(shape, q, k, v, tables), [q, k, v, *tables, q, q]
    )
    == backward
  )


@pytest.mark.slow
def test_compiles_for_tpu_and_beats_the_plain_path_there(tmp_path):
  """XLA's TPU compiler (libtpu, no TPU needed) compiles both kernels for H1's first layer (b=8)
  and H7's (b=10: windows at unaligned columns; 600 px: the most VMEM); the kernels' program
  moves a tenth of the bytes or less and needs a twentieth of the temp memory; the static
  schedules exist."""
  out = tmp_path / 'pallas.json'
  run = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'bench', 'pallas.py'),
      '--tiny',
      '--variants',
      'h1,h7',
      '--layers',
      '1',
      '--batch',
      '1',
      '--out',
      str(out),
    ],
    timeout=load.timeout(1500),
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  if run.returncode and 'libtpu not found' in run.stderr:  # The script says how to install it.
    missing = run.stderr.strip().splitlines()[-1]
    if os.environ.get('CI') == 'true':
      pytest.fail(f'libtpu is missing in CI: {missing}')
    pytest.skip(missing)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results['chip'] == 'v5e'
  layers = [row for rows in results['layers'].values() for row in rows]
  assert [row['name'] for row in layers] == ['stage1_block0'] * 2
  for row in layers:
    assert row['intensity_ratio'] >= 10, row
    assert row['temp_mib']['pallas'] <= row['temp_mib']['plain'] / 20, row
    assert set(row['kernel_cycles']) == {'halo_attention_forward', 'halo_attention_backward'}
    assert all(cycles > 0 for cycles in row['kernel_cycles'].values()), row
