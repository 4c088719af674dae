"""Networks that switch on every option of config.model at once (stems, each mixer, each gate,
BAM, avg_down shortcuts, final_width, bfloat16): which module each config name builds, where it
sits, the shapes between stages, and the dtype and BatchNorm mode of every layer.

The expected names, classes and shapes are written from the architecture (model.py's docstring,
the paper's stem and stage strides), not read from the code.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from halonet.models import networks
from tests import intercept

IMAGE = 32
WIDTHS = (8, 16, 16, 32)  # configs/tiny.py, r_b = 1: each stage's output width.
DEPTHS = (1, 2, 1, 1)  # Stage 2 has a block that does not downsample.
# The class each config name builds: the mixers of halonet/models/mixers, the gates of
# halonet/models/channel_attention.
MIXER_CLASSES = {
  'halo': 'HaloAttention',
  'sasa': 'LocalAttention',
  'global': 'GlobalAttention',
  'conv': 'Conv3x3',
  'sk': 'SelectiveKernel',
  'split': 'SplitAttention',
  'condconv': 'CondConv',
  'dynamic': 'DynamicConv',
}
GATE_CLASSES = {
  'se': 'SqueezeExcite',
  'eca': 'EfficientChannelAttention',
  'cbam': 'Cbam',
  'ge_minus': 'GatherExcite',
  'ge': 'GatherExcite',
  'ge_plus': 'GatherExcite',
}
# Softmax weights kept in float32 on purpose, cast where they multiply the bfloat16 paths.
FLOAT32_OUTPUTS = ('SelectKernelAttention',)
STEM_PARAMS = {
  'conv': ['stem_conv', 'stem_bn'],
  'sasa': ['stem_attention'],
  'deep': ['stem_deep'],
  'tiered': ['stem_deep'],
}
OPTIONS = {
  'convs_bam_sasa_stem': dict(
    stem='sasa',
    mixers=('sk', 'split', 'condconv', 'dynamic'),
    channel_attention=('se', 'eca', 'cbam', 'ge'),
    stage_attention='bam',
    shortcut='avg_down',
    final_width=48,
  ),
  'attention_deep_stem': dict(
    stem='deep',
    mixers=('halo', 'sasa', 'global', 'conv'),
    channel_attention=('ge_plus', '', 'se', ''),
    sasa_window=3,
  ),
  'tiered_stem': dict(stem='tiered', mixers=('conv', 'sk', 'halo', 'split')),
  'conv_stem': dict(
    stem='conv',
    mixers=('halo', 'halo', 'conv', 'halo'),
    channel_attention=('eca', 'ge_minus', '', 'cbam'),
    shortcut='avg_down',
    final_width=40,
  ),
}


def _config(options: dict):
  config = tiny.get_config()
  config.model.update(options)
  config.model.stage_depths = DEPTHS
  config.model.dtype = 'bfloat16'
  return config


def _record_calls(config, train: bool):
  """(path, class name, module, input, output) of every module call, and the variables: shapes
  and dtypes only (traced, nothing computed)."""
  net = networks.create_model(config)
  x = jax.ShapeDtypeStruct((2, IMAGE, IMAGE, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(1), x)
  apply = functools.partial(net.apply, train=train, mutable=['batch_stats'])
  with intercept.module_calls() as called:
    jax.eval_shape(lambda v, x: apply(v, x, rngs={'dropout': jax.random.key(2)}), variables, x)
  calls = [(m.path, type(m).__name__, m, inputs, out) for m, inputs, out in called]
  return calls, variables


@pytest.fixture(scope='module', params=sorted(OPTIONS))
def built(request):
  options = OPTIONS[request.param]
  config = _config(options)
  return options, config, {train: _record_calls(config, train) for train in (False, True)}


def test_each_config_name_builds_its_module_in_its_place(built):
  options, config, runs = built
  calls, variables = runs[False]
  # Only what a checkpoint holds: the multi-scale features are sown when applied, not at init.
  assert sorted(variables) == ['batch_stats', 'params']
  bam = ['stage1_bam', 'stage2_bam', 'stage3_bam'] if options.get('stage_attention') else []
  final = ['final_conv', 'final_bn'] if options.get('final_width') else []
  blocks = [f'stage{s}_block{i}' for s, depth in zip((1, 2, 3, 4), DEPTHS) for i in range(depth)]
  assert sorted(variables['params']) == sorted(
    STEM_PARAMS[options['stem']] + blocks + bam + final + ['head']  # timm's name for the classifier
  )
  children = {}
  for path, name, *_ in calls:
    if len(path) == 2 and path[0].startswith('stage') and '_block' in path[0]:
      children.setdefault(path[0], set()).add((path[1], name))
  gates = tuple(options.get('channel_attention', ('',) * 4))
  for block in blocks:
    stage = int(block[5]) - 1
    names = {name for _, name in children[block]}
    mixer = MIXER_CLASSES[options['mixers'][stage]]
    assert mixer in names, (block, names)
    assert not names & (set(MIXER_CLASSES.values()) - {mixer}), (block, names)
    gate = {name for child, name in children[block] if child == 'channel_attention'}
    assert gate == ({GATE_CLASSES[gates[stage]]} if gates[stage] else set()), (block, gate)


def test_stem_and_stages_stride_4_8_16_32_with_the_stages_widths(built):
  options, config, runs = built
  calls, _ = runs[False]
  first_block_input = {
    path[0]: x.shape for path, _, _, x, _ in calls if len(path) == 1 and path[0].endswith('block0')
  }
  # Every stem gives 64 channels at stride 4 (the 7x7/2 conv + 3x3/2 pool it stands in for).
  assert first_block_input['stage1_block0'] == (2, IMAGE // 4, IMAGE // 4, 64)
  for stage, width in enumerate(WIDTHS[:3], 1):
    side = IMAGE // 2 ** (stage + 1)
    assert first_block_input[f'stage{stage + 1}_block0'] == (2, side, side, width)
  last_block = [out for path, _, _, _, out in calls if path == ('stage4_block0',)]
  assert last_block[0].shape == (2, 1, 1, WIDTHS[3])
  bam = [(path[0], x.shape, out.shape) for path, name, _, x, out in calls if name == 'Bam']
  if options.get('stage_attention'):
    assert [b[0] for b in bam] == ['stage1_bam', 'stage2_bam', 'stage3_bam']
    assert all(x == out for _, x, out in bam)
  else:
    assert not bam


@pytest.mark.parametrize('train', [False, True])
def test_every_module_computes_in_bfloat16_but_the_float32_classifier(built, train):
  """Each module's floating outputs (layers, attention, mixers, gates, stems, blocks) are
  bfloat16; the classifier and so the network's logits are float32; parameters stay float32."""
  options, config, runs = built
  calls, variables = runs[train]
  outputs = [
    (path, name, module, leaf)
    for path, name, module, _, out in calls
    for leaf in jax.tree_util.tree_leaves(out)
    if jnp.issubdtype(leaf.dtype, jnp.floating)
  ]
  assert len({name for _, name, _, _ in outputs}) > 10
  for path, name, _, leaf in outputs:
    if path in ((), ('head',)) or name in FLOAT32_OUTPUTS:
      assert leaf.dtype == jnp.float32, name
    else:
      assert leaf.dtype == jnp.bfloat16, ('/'.join(path), name)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables['params']))


@pytest.mark.parametrize('train', [False, True])
def test_every_batchnorm_uses_batch_statistics_in_training_only(built, train):
  options, config, runs = built
  calls, variables = runs[train]
  norms = [(path, module) for path, name, module, *_ in calls if name == 'BatchNorm']
  stats = jax.tree_util.tree_leaves(variables['batch_stats'])
  assert len(norms) == len(stats) // 2 > 10  # Each BatchNorm is called once per forward pass.
  for path, module in norms:
    assert module.use_running_average is (not train), '/'.join(path)
    assert (module.momentum, module.epsilon) == (0.9, 1e-5)


def test_eval_logits_of_one_image_do_not_depend_on_the_rest_of_the_batch(built):
  options, config, _ = built
  config.model.dtype = 'float32'
  net = networks.create_model(config)
  x = jax.random.normal(jax.random.key(0), (3, IMAGE, IMAGE, 3))
  variables = jax.jit(functools.partial(net.init, train=False))(jax.random.key(1), x)
  apply = jax.jit(functools.partial(net.apply, train=False))
  together, alone = apply(variables, x), apply(variables, x[:1])
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(together[0]), rtol=1e-4, atol=1e-5)


def test_a_blocks_parameters_keep_their_names_and_a_projection_only_where_the_shape_changes():
  """A checkpoint names each layer of a block: 1x1 conv, BN, mixer, BN, 1x1 conv, BN, and the
  projection shortcut ('proj', 'proj_bn') only where the stride or width changes."""
  config = tiny.get_config()
  config.model.stage_depths = DEPTHS
  params = networks.abstract_variables(config)['params']
  body = ['Dense_0', 'BatchNorm_0', 'HaloAttention_0', 'BatchNorm_1', 'Dense_1', 'BatchNorm_2']
  for block in ('stage1_block0', 'stage2_block0', 'stage3_block0', 'stage4_block0'):
    assert sorted(params[block]) == sorted([*body, 'proj', 'proj_bn']), block
  assert sorted(params['stage2_block1']) == sorted(body)  # 16 -> 16 channels, stride 1.
  assert params['stage2_block0']['proj']['kernel'].shape == (8, 16)
