"""The backbone's pluggable parts against references written from their papers: SASA's window
attention per pixel (every form of it), its attention stem, BAM and Dynamic Convolution in NumPy;
SASA's Table 1 (params and FLOPs); one-line errors for bad settings. (The modules timm has are
checked against timm in tests/models/test_timm_modules.py.)"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import halonet as configs
from halonet import errors
from halonet.attention import IMPLEMENTATIONS
from halonet.attention import AttentionPlan
from halonet.models import channel_attention
from halonet.models import checks as model_checks
from halonet.models import mixers
from halonet.models import networks
from halonet.models import sasa_stem
from halonet.tools import variants as summary

RNG = np.random.default_rng(0)


def _softmax(logits):
  p = np.exp(logits - logits.max())
  return p / p.sum()


def naive_sasa(x, wq, wk, wv, rows, cols, k, stride):
  """SASA's y_ij = sum_{ab in N_k(ij)} softmax(q.k_ab + q.[r_row(a-i), r_col(b-j)]) v_ab per
  pixel and head, over the window's pixels inside the image; then the 2 x 2 mean when strided.
  rows, cols: [2 (k // 2) + 1, half] embeddings by offset + k // 2. W: [C, heads, width]."""
  batch, height, width, _ = x.shape
  heads, dk, dv = wq.shape[1], wq.shape[2], wv.shape[2]
  r = k // 2
  out = np.zeros((batch, height, width, heads * dv))
  for n, i, j in np.ndindex(batch, height, width):
    window = [
      (a, b)
      for a in range(i - r, i + r + 1)
      for b in range(j - r, j + r + 1)
      if 0 <= a < height and 0 <= b < width
    ]
    for head in range(heads):
      q = x[n, i, j] @ wq[:, head] / np.sqrt(dk)
      logits = [
        q @ (x[n, a, b] @ wk[:, head]) + q @ np.concatenate([rows[a - i + r], cols[b - j + r]])
        for a, b in window
      ]
      values = np.array([x[n, a, b] @ wv[:, head] for a, b in window])
      out[n, i, j, head * dv : (head + 1) * dv] = _softmax(np.array(logits)) @ values
  if stride == 1:
    return out
  pooled = np.zeros((batch, -(-height // 2), -(-width // 2), out.shape[-1]))
  for i, j in np.ndindex(*pooled.shape[1:3]):
    pooled[:, i, j] = out[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(1, 2))
  return pooled


def _sasa_params(c, heads, dk, k, block):
  """LocalAttention params with SASA's tables placed at their offsets in a block-form table."""
  halo = k // 2
  rows, cols = RNG.normal(size=(k, dk // 2)), RNG.normal(size=(k, dk - dk // 2))
  table_rows = 2 * (block + halo) - 1
  centre = block + halo - 1  # The table row of offset 0.
  table_h = RNG.normal(size=(table_rows, dk // 2))  # Rows never seen through the mask: random.
  table_w = RNG.normal(size=(table_rows, dk - dk // 2))
  table_h[centre - halo : centre + halo + 1], table_w[centre - halo : centre + halo + 1] = (
    rows,
    cols,
  )
  wq, wk, wv = (RNG.normal(size=(c, heads, dk)) / np.sqrt(c) for _ in range(3))
  params = {
    'attention': {
      'query': {'kernel': wq},
      'key_value': {'kernel': np.concatenate([wk, wv], axis=-1)},
      'relative_height': table_h,
      'relative_width': table_w,
    }
  }
  return params, (wq, wk, wv, rows, cols)


@pytest.mark.parametrize('impl', sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize(
  'block, hw, stride',
  [(1, (7, 9), 1), (4, (7, 9), 1), (4, (8, 8), 2), (1, (5, 6), 2), (3, (9, 5), 1)],
)
def test_sasa_window_attention_is_the_per_pixel_definition_in_every_form(impl, block, hw, stride):
  """b = 1 is SASA literally; b > 1 the blocked, masked form: both equal the per-pixel loop."""
  c, heads, dk, k = 6, 2, 4, 5
  x = RNG.normal(size=(2, *hw, c))
  layer = mixers.LocalAttention(
    value_width=heads * dk,
    stride=stride,
    qk_width=heads * dk,
    num_heads=heads,
    window=k,
    block_size=block,
    attention=AttentionPlan(impl),
  )
  params, weights = _sasa_params(c, heads, dk, k, block)
  got = jax.jit(layer.apply)({'params': params}, jnp.asarray(x, jnp.float32))
  want = naive_sasa(x, *weights, k, stride)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def naive_spatially_aware_attention(x, params, heads, block=sasa_stem.STEM_BLOCK):
  """SASA's stem attention per pixel: the keys of its 4 x 4 block, values mixed by the key's
  place (a, b) in the block with p(a, b, m) = softmax_m((e_row(a) + e_col(b)) . nu_m)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items() if not isinstance(v, dict)}
  wq = np.asarray(params['query']['kernel'], np.float64)
  wk = np.asarray(params['key']['kernel'], np.float64)
  wv = np.asarray(params['value']['kernel'], np.float64)  # [C, M, heads * dv]
  dk, mixtures = wq.shape[-1], wv.shape[1]
  dv = wv.shape[-1] // heads
  batch, height, width, _ = x.shape
  out = np.zeros((batch, height, width, heads * dv))
  for n, i, j in np.ndindex(batch, height, width):
    top, left = i // block * block, j // block * block
    keys = [
      (a, b)
      for a in range(top, min(top + block, height))
      for b in range(left, min(left + block, width))
    ]
    for head in range(heads):
      q = x[n, i, j] @ wq[:, head] / np.sqrt(dk)
      logits, values = [], []
      for a, b in keys:
        mix = _softmax(
          np.array(
            [
              (p['value_row_embedding'][a % block] + p['value_col_embedding'][b % block])
              @ p['mixture_embedding'][m]
              for m in range(mixtures)
            ]
          )
        )
        w_v = sum(mix[m] * wv[:, m, head * dv : (head + 1) * dv] for m in range(mixtures))
        position = np.concatenate(
          [
            p['relative_height'][a - i + block - 1],
            p['relative_width'][b - j + block - 1],
          ]
        )
        logits.append(q @ (x[n, a, b] @ wk[:, head]) + q @ position)
        values.append(x[n, a, b] @ w_v)
      out[n, i, j, head * dv : (head + 1) * dv] = _softmax(np.array(logits)) @ np.array(values)
  return out


def test_stem_attention_mixes_values_by_the_keys_place_in_its_block():
  x = RNG.normal(size=(2, 8, 6, 3))
  layer = sasa_stem.SpatiallyAwareAttention(
    qk_width=8,
    value_width=8,
    num_heads=2,
    block_size=4,
    halo_size=0,
    num_mixtures=3,
    position_embedding='split',
    attention=AttentionPlan('plain'),
  )
  params = layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32))['params']
  params = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=p.shape), jnp.float32), params)
  got = layer.apply({'params': params}, jnp.asarray(x, jnp.float32))
  want = naive_spatially_aware_attention(x, params, heads=2)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_attention_stem_gives_the_conv_stems_map():
  """224 px in, 56 x 56 x 64 out (4 x 4 blocks, 4 x 4 max-pool), as the conv stem gives."""
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  stem = sasa_stem.AttentionStem(width=64, num_heads=8, norm=norm, attention=AttentionPlan('plain'))
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  out = jax.eval_shape(lambda x: stem.init_with_output(jax.random.key(0), x)[0], images)
  assert out.shape == (1, 56, 56, 64)


def _eval_bn(x, stats, eps=1e-5):
  return (x - stats['mean']) / np.sqrt(stats['var'] + eps) * stats['scale'] + stats['bias']


def _conv(x, kernel, bias=None, dilation=1, stride=1):
  """Direct convolution: every tap of an HWIO kernel, symmetric 'same' padding."""
  k = kernel.shape[0]
  pad = dilation * (k - 1) // 2
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  height, width = x.shape[1:3]
  out = np.zeros((x.shape[0], height, width, kernel.shape[-1]))
  for i, j in np.ndindex(k, k):
    out += (
      padded[:, i * dilation : i * dilation + height, j * dilation : j * dilation + width]
      @ (kernel[i, j])
    )
  out = out[:, ::stride, ::stride]
  return out if bias is None else out + bias


def _random_variables(module, x):
  variables = module.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  randomised = {}
  for collection, tree in variables.items():
    randomised[collection] = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.asarray(
        RNG.uniform(0.5, 2.0, v.shape) if path[-1].key == 'var' else RNG.normal(size=v.shape),
        jnp.float32,
      ),
      tree,
    )
  return randomised


def test_bam_is_its_papers_equations():
  x = RNG.normal(size=(2, 6, 7, 32))
  norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)
  bam = channel_attention.Bam(norm=norm)
  variables = _random_variables(bam, x)
  got = bam.apply(variables, jnp.asarray(x, jnp.float32))

  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables['params'])
  s = jax.tree.map(lambda v: np.asarray(v, np.float64), variables['batch_stats'])
  bn = lambda name, v: _eval_bn(v, {**p[name], **s[name]})
  dense = lambda name, v: v @ p[name]['kernel'] + p[name]['bias']
  # M_c = BN(MLP(AvgPool(F))), r = 16: 32 -> 2 -> 32.
  pooled = x.mean(axis=(1, 2))
  m_c = bn('channel_bn', dense('channel_fc1', np.maximum(dense('channel_fc0', pooled), 0)))
  # M_s: 1x1 reduce, two 3x3 convs dilated by 4, 1x1 to one map; BN (and ReLU) between.
  m_s = np.maximum(bn('spatial_bn0', dense('spatial_reduce', x)), 0)
  for i in (1, 2):
    conv = p[f'spatial_dilated{i}']
    m_s = np.maximum(bn(f'spatial_bn{i}', _conv(m_s, conv['kernel'], conv['bias'], 4)), 0)
  m_s = bn('spatial_bn3', dense('spatial_out', m_s))
  gate = 1 / (1 + np.exp(-(m_c[:, None, None, :] + m_s)))
  np.testing.assert_allclose(np.asarray(got), x + x * gate, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('stride', [1, 2])
def test_dynamic_convolution_is_its_papers_equations(stride):
  x = RNG.normal(size=(3, 6, 5, 8))
  conv = mixers.DynamicConv(value_width=12, stride=stride, num_kernels=3, temperature=2.0)
  variables = _random_variables(conv, x)
  got = conv.apply(variables, jnp.asarray(x, jnp.float32))

  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables['params'])
  dense = lambda name, v: v @ p[name]['kernel'] + p[name]['bias']
  want = []
  for n in range(x.shape[0]):
    # pi = softmax(FC(ReLU(FC(GAP(x)))) / tau), then W = sum_k pi_k W_k, b = sum_k pi_k b_k.
    z = dense('attention_fc2', np.maximum(dense('attention_fc1', x[n].mean(axis=(0, 1))), 0))
    pi = _softmax(z / 2.0)
    kernel = np.tensordot(pi, p['kernels'], axes=1)
    bias = pi @ p['biases']
    want.append(_conv(x[n : n + 1], kernel, bias, stride=stride)[0])
  np.testing.assert_allclose(np.asarray(got), np.array(want), rtol=1e-4, atol=1e-4)


# SASA's Table 1: (params M, GFLOPs) of its ResNets, conv / conv stem + attention / attention.
SASA_TABLE_1 = {
  'resnet26': (13.7, 4.7),
  'sasa_resnet26_conv_stem': (10.3, 4.5),
  'sasa_resnet26': (10.3, 4.7),
  'resnet38': (19.6, 6.5),
  'sasa_resnet38_conv_stem': (14.1, 5.7),
  'sasa_resnet38': (14.1, 6.0),
  'resnet50': (25.6, 8.2),
  'sasa_resnet50_conv_stem': (18.0, 7.0),
  'sasa_resnet50': (18.0, 7.2),
}


@pytest.mark.parametrize('name', list(SASA_TABLE_1))
def test_sasa_resnets_have_table_1s_parameters_and_flops(name):
  params_m, gflops = SASA_TABLE_1[name]
  config = configs.get_config(name)
  assert abs(networks.count_params(config) / 1e6 - params_m) <= 0.01 * params_m
  # XLA counts the convolutions and products (a multiply-add as 2), not BN or ReLU.
  assert abs(summary.gflops_per_image(config) - gflops) <= 0.04 * gflops


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'model.mixers': ('halo', 'sasa')}, "mixers=('halo', 'sasa') needs one entry per stage (4)"),
    ({'model.mixers': ('halo', 'sasa', 'nope', 'conv')}, "'nope' is not one of"),
    ({'model.channel_attention': ('se', 'se', 'se', 'sse')}, "'sse' is not one of"),
    ({'model.stage_attention': 'cbam'}, "stage_attention='cbam' is not one of"),
    ({'model.stem': 'patch'}, "stem='patch' is not one of"),
    ({'model.shortcut': 'pool'}, "shortcut='pool' is not one of"),
    ({'model.mixers': ('sk',) * 4, 'model.sk_kernels': ()}, 'sk_kernels=() needs at least one'),
    ({'model.mixers': ('sk',) * 4, 'model.sk_kernels': (3, 4)}, 'sk_kernels=(3, 4) needs'),
    ({'model.mixers': ('sk',) * 4, 'model.sk_kernels': (3, 5, 7)}, 'do not split its width 8'),
    ({'model.mixers': ('sasa',) * 4, 'model.sasa_window': 9}, 'sasa_window=9 is larger than'),
    ({'model.mixers': ('sasa',) * 4, 'model.sasa_window': 4}, 'sasa_window=4 must be odd'),
    ({'model.mixers': ('sasa',) * 4, 'model.block_size': 0}, 'stage 1: block_size=0 must be'),
    ({'model.mixers': ('split',) * 4, 'model.radix': 0}, 'radix=0 needs to be at least 1'),
    ({'model.mixers': ('dynamic',) * 4, 'model.num_experts': 0}, 'num_experts=0 needs'),
    ({'model.mixers': ('conv',) * 4, 'model.conv_stages': (1,)}, 'both set the stages'),
    (
      {'model.stem': 'sasa', 'model.mixers': ('conv',) * 4, 'model.num_heads': (3, 2, 2, 2)},
      'does not divide the stem',
    ),
    # 32 px: stage maps of 8, 4, 2 and 1 px.
    (
      {'model.mixers': ('conv', 'conv', 'conv', 'sasa'), 'model.sasa_window': 3},
      'stage 4: sasa_window=3 is larger than its 1 x 1 input map',
    ),
    (
      {'model.block_sizes': (4, 3, 4, 4), 'model.halo_sizes': (1, 1, 1, 1)},
      'stage 2: block_size=3',
    ),
    (
      {'model.num_heads': (8, 2, 2, 2), 'model.value_ratio': 1.5},
      'stage 1: num_heads=8 does not divide its value width 12',
    ),
    ({'model.num_heads': (2, 0, 2, 2)}, 'stage 2: num_heads=0 does not divide its width 16'),
    ({'model.widths': (8, 16, 16)}, 'widths=(8, 16, 16) needs one entry per stage (4)'),
    ({'model.stage_depths': (1, 1, 1, 1, 1)}, 'stage_depths=(1, 1, 1, 1, 1) needs one entry'),
    ({'model.channel_attention': ('se',) * 3}, "channel_attention=('se', 'se', 'se') needs one"),
    (
      {'model.conv_stages': (1, 0, 5)},
      'conv_stages=(1, 0, 5) may only name stages 1-4, got [0, 5]',
    ),
    ({'model.mixers': ('sk', 'conv', 'conv', 'conv'), 'model.sk_kernels': (5, 1)}, 'sk_kernels'),
    ({'model.mixers': ('condconv',) * 4, 'model.num_experts': 0}, 'num_experts=0 needs'),
  ],
)
def test_bad_module_settings_fail_in_one_line_naming_the_value(overrides, message):
  config = configs.get_config('tiny')
  config.update_from_flattened_dict(overrides)
  with pytest.raises(errors.ConfigError) as raised:
    model_checks.validate_config(config)
  text = str(raised.value)
  assert message in text and '\n' not in text, text


@pytest.mark.parametrize(
  'overrides',
  [
    {'model.mixers': ('sasa', 'conv', 'conv', 'conv'), 'model.sasa_window': 7},
    {'model.mixers': ('conv', 'conv', 'conv', 'sasa'), 'model.sasa_window': 1},
    {'model.mixers': ('sk', 'split', 'condconv', 'dynamic'), 'model.sk_kernels': (3,)},
    {'model.mixers': ('sk',) * 4, 'model.sk_kernels': (3, 5)},
    {'model.mixers': ('split', 'conv', 'global', 'halo'), 'model.radix': 1},
    {'model.mixers': ('condconv', 'dynamic', 'conv', 'conv'), 'model.num_experts': 1},
    {'model.stem': 'sasa', 'model.num_heads': (4, 2, 2, 2), 'model.shortcut': 'avg_down'},
    {'model.stem': 'deep', 'model.channel_attention': ('se', 'eca', 'cbam', 'ge_plus')},
    {'model.stem': 'tiered', 'model.stage_attention': 'bam', 'model.dtype': 'bfloat16'},
    {'model.num_heads': (8, 2, 2, 2), 'model.value_ratio': 2.0, 'model.dtype': 'auto'},
    {'model.conv_stages': (1, 2, 3, 4), 'model.activation': 'silu'},
    # Settings of mixers no stage uses are not checked.
    {'model.sk_kernels': (), 'model.radix': 0, 'model.num_experts': 0, 'model.sasa_window': 4},
  ],
)
def test_settings_at_their_limits_are_accepted(overrides):
  config = configs.get_config('tiny')
  config.update_from_flattened_dict(overrides)
  model_checks.validate_config(config)
  networks.abstract_variables(config)  # And the network they describe builds.


def test_bam_follows_stages_1_to_3_and_gates_follow_every_block():
  """BAM where the map shrinks (after stages 1-3, not after the last); a block's channel
  attention in every block of the stages that name it."""
  config = configs.get_config('tiny')
  config.model.stage_attention = 'bam'
  config.model.stage_depths = (2, 1, 1, 1)
  config.model.channel_attention = ('cbam', '', 'se', '')
  params = networks.abstract_variables(config)['params']
  assert sorted(k for k in params if k.endswith('_bam')) == [
    'stage1_bam',
    'stage2_bam',
    'stage3_bam',
  ]
  gated = sorted(k for k, v in params.items() if 'channel_attention' in v)
  assert gated == ['stage1_block0', 'stage1_block1', 'stage3_block0']
