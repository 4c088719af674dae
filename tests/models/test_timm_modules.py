"""The survey's attention modules against timm's own, on timm's randomly initialised weights
(BatchNorm randomised, eval mode) converted by halonet/tools/convert.py's name rules; and the
ResNet-50 variants timm has against this project's same networks, by parameter count, with the
deep and tiered stems and the average-pooled shortcut of the 'd'/'t' ones against timm's on its
weights.

PyTorch runs in a subprocess (tests/scripts/timm_modules.py, via tests/torch_side.py).
"""

import functools
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import halonet as configs
from halonet.models import channel_attention
from halonet.models import deep_stem
from halonet.models import halonet as model_lib
from halonet.models import mixers
from halonet.models import networks
from halonet.tools import convert
from tests import torch_side

TOLERANCE = 1e-5  # Of the largest reference magnitude.
WIDTH = 32  # CHANNELS of the script.
NORM = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)

# Each case's Flax module, built as the network builds it (value_width, stride; norm, act).
MODULES = {
  'se': lambda: channel_attention.SqueezeExcite(),
  'eca': lambda: channel_attention.EfficientChannelAttention(),
  'cbam': lambda: channel_attention.Cbam(norm=NORM),
  'ge_minus': lambda: channel_attention.BLOCK_MODULES['ge_minus'](norm=NORM),
  'ge': lambda: channel_attention.BLOCK_MODULES['ge'](norm=NORM),
  'ge_plus': lambda: channel_attention.BLOCK_MODULES['ge_plus'](norm=NORM),
  'sk': lambda: mixers.SelectiveKernel(WIDTH, 1, NORM, nn.relu),
  'sk_stride2': lambda: mixers.SelectiveKernel(WIDTH, 2, NORM, nn.relu),
  'split': lambda: mixers.SplitAttention(WIDTH, 1, NORM, nn.relu),
  'split_stride2': lambda: mixers.SplitAttention(WIDTH, 2, NORM, nn.relu),
  'condconv': lambda: mixers.CondConv(WIDTH, 1),
  'global': lambda: mixers.GlobalAttention(WIDTH, 1, qk_width=WIDTH, num_heads=4),
  'global_stride2': lambda: mixers.GlobalAttention(WIDTH, 2, qk_width=WIDTH, num_heads=4),
}


@pytest.fixture(scope='module')
def references(tmp_path_factory):
  out = tmp_path_factory.mktemp('timm_modules')
  torch_side.run_script('timm_modules.py', out)
  return out


def _converted_output(references, name):
  """The Flax module's output on the case's input, with timm's weights converted into it."""
  data = np.load(references / f'{name}.npz')
  module, x = MODULES[name](), data['x']
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)
  # Under a block, as in a network: the converter's rules name a block's attention layers
  # ('self_attn', timm's BottleneckAttn's fused qkv) and gates ('attn').
  inner = 'block' if name.startswith('global') else 'block.attn'
  prefix = 'block.self_attn' if inner == 'block' else inner
  state = {f'{prefix}.{k[len("state/") :]}': data[k] for k in data if k.startswith('state/')}
  state = {re.sub(r'\.paths\.(\d+)\.', r'.paths_\1.', k): v for k, v in state.items()}
  wrap = lambda tree: {'block': tree} if inner == 'block' else {'block': {'attn': tree}}
  abstract = {c: wrap(abstract.get(c, {})) for c in ('params', 'batch_stats')}
  variables = convert.convert(name, state, abstract)
  unwrap = lambda tree: tree['block'] if inner == 'block' else tree['block']['attn']
  variables = {c: unwrap(v) for c, v in variables.items() if v}
  return module.apply(variables, x), data['y']


@pytest.mark.parametrize('name', list(MODULES))
def test_module_gives_timms_output_on_timms_weights(references, name):
  _assert_close(*_converted_output(references, name))


# timm's ResNet-50 variants as overrides of resnet50. The 'd' and 't' ones have deep or tiered
# stems and average-pooled shortcuts. Not here: gcresnet50t (Global Context, not one of the
# survey's modules) and resnest50d's 3x3 average pool in place of a strided split conv (avd: no
# parameters, so its count is still checked).
_D = {'model.stem': 'deep', 'model.shortcut': 'avg_down'}
NETWORKS = {
  'resnet50': {},
  'seresnet50': {'model.channel_attention': ('se',) * 4},
  'skresnet50': {'model.mixers': ('sk',) * 4},
  'resnet50d': _D,
  'ecaresnet50d': {**_D, 'model.channel_attention': ('eca',) * 4},
  'ecaresnet50t': {**_D, 'model.stem': 'tiered', 'model.channel_attention': ('eca',) * 4},
  'resnest50d': {**_D, 'model.mixers': ('split',) * 4},
}


@pytest.mark.parametrize('name', list(NETWORKS))
def test_resnet50_variant_has_timms_parameter_count(references, name):
  config = configs.get_config('resnet50')
  config.update_from_flattened_dict(NETWORKS[name])
  want = int(np.load(references / 'networks.npz')[name])
  assert networks.count_params(config) == want


def _state(data):
  """The case's torch state dict, by its own keys."""
  return {k[len('state/') :]: v for k, v in data.items() if k.startswith('state/')}


def _batch_norm(data, prefix):
  """A torch BatchNorm2d's state as Flax (params, batch_stats)."""
  params = {'scale': data[f'{prefix}.weight'], 'bias': data[f'{prefix}.bias']}
  stats = {'mean': data[f'{prefix}.running_mean'], 'var': data[f'{prefix}.running_var']}
  return params, stats


def _assert_close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  error = float(np.abs(got - want).max() / np.abs(want).max())
  assert error <= TOLERANCE, f'relative error {error:.2e}'


@pytest.mark.parametrize('kind', list(deep_stem.WIDTHS))
def test_deep_stem_gives_timms_output_on_timms_weights(references, kind):
  """timm's stem is Sequential(conv1 = [conv, bn, act, conv, bn, act, conv], bn1, act1, maxpool)."""
  data = np.load(references / f'{kind}_stem.npz')
  state = _state(data)
  params, stats = {}, {}
  for i in (1, 2, 3):
    params[f'conv{i}'] = {'kernel': state[f'0.{3 * (i - 1)}.weight'].transpose(2, 3, 1, 0)}
    bn = f'0.{3 * (i - 1) + 1}' if i < 3 else '1'
    params[f'bn{i}'], stats[f'bn{i}'] = _batch_norm(state, bn)
  stem = deep_stem.DeepStem(kind=kind, norm=NORM)
  _assert_close(stem.apply({'params': params, 'batch_stats': stats}, data['x']), data['y'])


def test_avg_down_shortcut_gives_timms_output_on_timms_weights(references):
  """A fresh block's branch is zero (its last BatchNorm scale starts at 0), so it returns
  relu(shortcut(x)): with timm's downsample_avg weights, relu of timm's output on an odd map."""
  data = np.load(references / 'avg_down.npz')
  block = model_lib.BottleneckBlock(
    width=8,
    out_width=2 * WIDTH,
    value_width=8,
    stride=2,
    mixer=mixers.Conv3x3,
    mixer_normalizes=False,
    channel_attention=None,
    avg_down=True,
    drop_path_rate=0.0,
    act=nn.relu,
    norm=NORM,
    dtype=np.float32,
  )
  x = data['x']
  variables = jax.tree.map(np.asarray, block.init(jax.random.key(0), x, False))
  state = _state(data)
  variables['params']['proj'] = {'kernel': state['1.weight'][:, :, 0, 0].T}
  bn_params, bn_stats = _batch_norm(state, '2')
  variables['params']['proj_bn'], variables['batch_stats']['proj_bn'] = bn_params, bn_stats
  _assert_close(block.apply(variables, x, False), np.maximum(data['y'], 0))
