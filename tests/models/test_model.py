"""The model family against the paper's table, plus shape and validation behaviour."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import halonet as named_configs
from configs import timm as timm_configs
from configs import tiny
from halonet.attention import AttentionPlan
from halonet.models import halonet as model
from halonet.models import mixers
from halonet.models import networks
from halonet.models.timm import byob
from tests import forms
from tests import intercept

# Typed in from the paper's table of HaloNet variants (Params, M): independent of
# halonet/models/paper.py.
PAPER_PARAMS_M = {
  'h0': 5.5,
  'h1': 8.1,
  'h2': 9.4,
  'h3': 12.3,
  'h4': 19.1,
  'h5': 30.7,
  'h6': 43.4,
  'h7': 67.0,
}
# H3's published row does not reach its published count (see halonet/models/halonet.py's docstring).
H3_COUNT = 11_834_728


@pytest.mark.parametrize('variant', sorted(PAPER_PARAMS_M))
def test_variant_params_match_paper(variant):
  count = networks.count_params(named_configs.get_config(variant))
  if variant == 'h3':
    assert count == H3_COUNT
  else:
    assert abs(count / 1e6 - PAPER_PARAMS_M[variant]) / PAPER_PARAMS_M[variant] < 0.01


def test_variant_rows_match_paper():
  # b, h, r_v, r_b, l_3, s, d_f from the paper's table.
  rows = {
    'h0': (8, 3, 1.0, 0.5, 7, 256, 0),
    'h4': (12, 2, 1.0, 3, 12, 384, 1280),
    'h7': (10, 3, 4, 3.5, 26, 600, 2048),
  }
  for name, (b, h, rv, rb, l3, s, df) in rows.items():
    c = named_configs.get_config(name)
    m = c.model
    assert (m.block_size, m.halo_size, m.value_ratio, m.bottleneck_ratio) == (b, h, rv, rb)
    assert (tuple(m.stage_depths), c.image_size, m.final_width) == ((3, 3, l3, 3), s, df)


def test_h7_stage_shapes_at_600px():
  """s=600 with b=10 gives 75x75 and 38x38 maps that b does not divide; they must work."""
  config = named_configs.get_config('h7')
  net = networks.create_model(config)
  with intercept.module_calls() as called:
    jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 600, 600, 3)), train=False))
  shapes = {m.name: out.shape for m, _, out in called if isinstance(m, model.BottleneckBlock)}
  assert shapes['stage2_block0'][1:3] == (75, 75)
  assert shapes['stage3_block0'][1:3] == (38, 38)
  assert shapes['stage4_block0'][1:3] == (19, 19)


def test_tiny_forward_train_and_eval():
  config = tiny.get_config()
  config.model.use_se = True
  config.model.activation = 'silu'
  config.model.stochastic_depth_rate = 0.2
  config.model.conv_stages = (1,)
  net = networks.create_model(config)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.jit(functools.partial(net.init, train=False))(jax.random.key(0), x)
  logits, updates = jax.jit(
    lambda v, x: net.apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)}
    )
  )(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  eval_logits = jax.jit(functools.partial(net.apply, train=False))({**variables, **updates}, x)
  assert eval_logits.shape == (2, 10)


def test_bfloat16_compute_keeps_float32_params():
  config = tiny.get_config()
  config.model.dtype = 'bfloat16'
  net = networks.create_model(config)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables['params']))
  assert jax.eval_shape(functools.partial(net.apply, train=False), variables, x).dtype == (
    jnp.float32
  )


def test_conv_stages_replace_attention():
  all_attention = networks.count_params(tiny.get_config())
  config = tiny.get_config()
  config.model.conv_stages = (1, 2, 3, 4)
  params = networks.abstract_variables(config)['params']
  assert not any('HaloAttention' in k for k in params['stage1_block0'])
  assert networks.count_params(config) != all_attention


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('model.block_size', 0, 'block_size=0'),
    ('model.halo_size', -1, 'halo_size=-1'),
    ('model.num_heads', (3, 2, 2, 2), 'num_heads=3'),
    ('model.conv_stages', (0, 5), r'conv_stages=\(0, 5\)'),
    ('model.activation', 'gelu', "activation='gelu'"),
    ('model.block_size', 3, 'block_size=3'),  # stride-2 stages need an even block.
    ('model.mask_window', 4, 'mask_window=4'),
    ('model.attention_impl', 'fast', "attention_impl='fast'"),
    ('model.dtype', 'float16', "dtype='float16'"),
  ],
)
def test_bad_values_fail_with_one_line(field, value, message):
  config = tiny.get_config()
  node, key = config, field
  if '.' in field:
    node, key = config.model, field.split('.')[1]
  node[key] = value
  with pytest.raises(ValueError, match=message) as info:
    networks.create_model(config)
  assert '\n' not in str(info.value)


def test_unknown_config_name():
  with pytest.raises(ValueError, match="unknown HaloNet config 'h8'"):
    named_configs.get_config('h8')


@pytest.mark.parametrize(
  'backend, dtype, impl',
  [('tpu', 'bfloat16', 'plain'), ('gpu', 'bfloat16', 'plain'), ('cpu', 'float32', 'rows')],
)
def test_paper_configs_resolve_auto_per_backend(backend, dtype, impl):
  net = networks.create_model(named_configs.get_config('h7'), backend=backend)
  assert (net.dtype, net.attention) == (dtype, AttentionPlan(impl))


def test_large_variants_rematerialise_by_default():
  """From 448 px (H5-H7) a step needs GBs per image without remat (README, Benchmarks)."""
  assert {name: named_configs.get_config(name).model.remat for name in PAPER_PARAMS_M} == {
    f'h{i}': i >= 5 for i in range(8)
  }


def test_explicit_choices_and_cpu_configs_are_kept_on_every_backend():
  config = named_configs.get_config('h1')
  config.model.dtype, config.model.attention_impl = 'float32', 'rows'
  net = networks.create_model(config, backend='tpu')
  assert (net.dtype, net.attention) == ('float32', AttentionPlan('rows'))
  assert networks.create_model(tiny.get_config(), backend='tpu').dtype == 'float32'


def test_a_timm_arch_is_built_as_timms_network_with_the_runs_settings():
  config = timm_configs.get_config('halonet26t')
  config.num_classes = 7
  config.model.stochastic_depth_rate, config.model.dropout_rate = 0.1, 0.2
  for backend, dtype, impl in (('cpu', 'float32', 'rows'), ('tpu', 'bfloat16', 'plain')):
    net = networks.create_model(config, backend=backend)
    assert isinstance(net, byob.ByobNet) and net.arch == 'halonet26t'
    assert (net.num_classes, net.dtype, net.attention) == (7, dtype, AttentionPlan(impl))
    assert (net.stochastic_depth_rate, net.dropout_rate) == (0.1, 0.2)
  assert networks.abstract_variables(config)['params']['head']['kernel'].shape[-1] == 7


@pytest.mark.parametrize('config', [tiny.get_config(), timm_configs.get_config('halonet26t')])
def test_measured_forms_reach_the_layers_in_one_plan_over_the_hosts_rule(config):
  """Given the forms measured per layer, 'auto' becomes one plan that holds them over this host's
  rule (rows on CPU) for layers not measured; without them, the rule alone. An explicit form
  takes no measured ones."""
  choice = (('some layer key', 'plain'),)
  measured = networks.create_model(config, measured=choice)
  assert measured.attention == AttentionPlan('rows', choice)
  assert networks.create_model(config).attention == AttentionPlan('rows')
  assert networks.create_model(config).dtype == 'float32'  # 'auto' on this CPU host.
  config.model.attention_impl = 'plain'
  assert networks.create_model(config, measured=choice).attention == AttentionPlan('plain')


def _loss_and_grads(config, x):
  net = networks.create_model(config)
  variables = jax.jit(lambda x: net.init(jax.random.key(0), x, train=False))(x)

  def loss(params):
    logits, _ = net.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(logits * jnp.arange(logits.shape[-1]))

  return jax.jit(jax.value_and_grad(loss))(variables['params'])


def _plain_tiny():
  config = tiny.get_config()
  config.model.attention_impl = 'plain'
  return config, jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


@functools.cache
def _plain_loss_and_grads():
  """The reference of each case below, computed once."""
  return _loss_and_grads(*_plain_tiny())


@pytest.mark.parametrize(
  'field, value', [('remat', True), ('attention_impl', 'plain'), ('attention_impl', 'rows')]
)
def test_remat_and_implementations_give_the_same_loss_and_gradients(field, value):
  """Against the plain, non-rematerialised model: same function, same gradients (up to float32
  rounding through training-mode batch norm)."""
  config, x = _plain_tiny()
  want = _plain_loss_and_grads()
  config.model[field] = value
  got = _loss_and_grads(config, x)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=3e-4, atol=1e-5), got[1], want[1])


def test_remat_recomputes_blocks_in_the_backward_pass():
  """With remat each block's forward runs again inside the gradient: more FLOPs, less memory.

  Wide blocks, so they (not the stem) dominate; conftest.py keeps XLA:CPU from undoing remat.
  """

  def compiled(remat):
    config = tiny.get_config()
    config.model.remat = remat
    config.model.widths, config.model.stage_depths = (32, 32, 32, 32), (4, 1, 1, 1)
    config.model.attention_impl = 'plain'  # Its residuals (logits) are what remat drops.
    net = networks.create_model(config)
    x = jnp.zeros((4, 64, 64, 3))
    variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), x[:1])
    loss = lambda p, stats: net.apply(
      {'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
    )[0].sum()
    return jax.jit(jax.grad(loss)).lower(variables['params'], variables['batch_stats']).compile()

  plain, remat = compiled(False), compiled(True)
  assert remat.cost_analysis()['flops'] > 1.1 * plain.cost_analysis()['flops']
  assert (
    remat.memory_analysis().temp_size_in_bytes < 0.7 * plain.memory_analysis().temp_size_in_bytes
  )


def _tiny_count(**model_fields) -> int:
  config = tiny.get_config()
  config.model.update(model_fields)
  return networks.count_params(config)


def test_options_add_the_parameters_counted_by_hand():
  """configs/tiny.py: block output widths C = 8, 16, 16, 32 (r_b = 1), 2 heads, b = 4, h = 1,
  10 classes. Each count below is written from the architecture, not read from the code."""
  base_count = _tiny_count()
  # Squeeze-excite per block: Dense C -> r and r -> C, with biases, r = max(8, C // 16).
  se = lambda widths: sum(
    c * max(8, c // 16) + max(8, c // 16) + max(8, c // 16) * c + c for c in widths
  )
  assert _tiny_count(use_se=True) - base_count == se((8, 16, 16, 32))
  # A 256-wide last stage, where the reduction is C // 16 = 16 units rather than the floor of 8.
  wide = (8, 16, 16, 256)
  assert _tiny_count(use_se=True, widths=wide) - _tiny_count(widths=wide) == se(wide)
  # Stage 1 as a conv: the 3x3 conv (9 * 8 * 8, no bias) replaces the attention's query (8 * 8),
  # key/value (8 * 16) projections and its two relative tables ((2 (b + h) - 1) * d_k each).
  attention = 8 * 8 + 8 * 16 + 2 * (2 * (4 + 1) - 1) * 4
  assert _tiny_count(conv_stages=(1,)) - base_count == 9 * 8 * 8 - attention
  # final_width: a 1x1 conv 32 -> 64 with BN (scale, offset), and a head reading 64, not 32.
  assert _tiny_count(final_width=64) - base_count == 32 * 64 + 2 * 64 + (64 - 32) * 10
  # SiLU and the drop rates have no parameters.
  assert _tiny_count(activation='silu', stochastic_depth_rate=0.5, dropout_rate=0.5) == base_count


def test_only_mixers_that_normalise_their_output_skip_the_blocks_norm_after_them():
  """SK and Split Attention end with their own BatchNorm and activation, so a block feeds their
  output straight to its last 1x1 projection; after any other mixer (the 3x3 conv here) the block
  normalises and activates it first."""
  config = tiny.get_config()
  config.model.mixers = ('sk', 'split', 'conv', 'conv')
  x = jax.random.normal(jax.random.key(0), (2, config.image_size, config.image_size, 3))
  with intercept.module_calls() as called:
    networks.create_model(config).init(jax.random.key(0), x, train=False)
  in_block = [c for c in called if isinstance(c[0].parent, model.BottleneckBlock)]
  mixed = {
    module.parent.name: out
    for module, _, out in in_block
    if isinstance(module, (mixers.SelectiveKernel, mixers.SplitAttention, mixers.Conv3x3))
  }
  # A block's 1x1 projections, in call order: the last that is not the shortcut's reads the mixer.
  projected = {
    module.parent.name: inputs
    for module, inputs, _ in in_block
    if isinstance(module, nn.Dense) and module.name != 'proj'
  }
  assert sorted(mixed) == sorted(projected) == [f'stage{s}_block0' for s in (1, 2, 3, 4)]
  for stage in (1, 2):
    np.testing.assert_array_equal(projected[f'stage{stage}_block0'], mixed[f'stage{stage}_block0'])
  for stage in (3, 4):
    assert not np.allclose(projected[f'stage{stage}_block0'], mixed[f'stage{stage}_block0'])


def _calls(config, x, module_type, train, unit_bn_scales=False):
  """(module, input, output) of every call of `module_type` in one forward pass.

  `unit_bn_scales`: every BN scale set to 1, so residual branches (zero at init) carry signal.
  """
  net = networks.create_model(config)
  variables = jax.jit(lambda x: net.init(jax.random.key(0), x, train=False))(x[:1])
  if unit_bn_scales:
    variables = {
      **variables,
      'params': jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ones_like(p) if path[-1].key == 'scale' else p, variables['params']
      ),
    }
  with intercept.module_calls() as called:
    net.apply(
      variables, x, train=train, mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)}
    )
  return [c for c in called if isinstance(c[0], module_type)], variables


def test_activation_is_applied_once_at_each_block_output():
  """At init the last BN of a block has scale 0, so in eval mode a block returns
  act(BN(proj(x[::s, ::s]))) with BN's initial statistics (mean 0, variance 1): silu once."""
  config = tiny.get_config()
  config.model.activation = 'silu'
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  calls, variables = _calls(config, x, model.BottleneckBlock, train=False)
  assert len(calls) == 4
  for block, inputs, out in calls:
    kernel = np.asarray(variables['params'][block.name]['proj']['kernel'])
    z = np.asarray(inputs)[:, :: block.stride, :: block.stride] @ kernel / np.sqrt(1 + 1e-5)
    np.testing.assert_allclose(np.asarray(out), z / (1 + np.exp(-z)), rtol=1e-4, atol=1e-5)


def test_stochastic_depth_drops_whole_examples_at_rates_rising_with_depth():
  config = tiny.get_config()
  config.model.stochastic_depth_rate = 0.6
  x = jax.random.normal(jax.random.key(3), (64, 32, 32, 3))
  calls, _ = _calls(config, x, nn.Dropout, train=True, unit_bn_scales=True)
  per_block = [(m, i, o) for m, i, o in calls if m.broadcast_dims == (1, 2, 3)]
  # Linear in the block index: 0, 0.6/3, 2*0.6/3, 0.6 for 4 blocks.
  assert [m.rate for m, _, _ in per_block] == pytest.approx([0.0, 0.2, 0.4, 0.6])
  module, inputs, out = per_block[-1]
  inputs, out = np.asarray(inputs, np.float64), np.asarray(out, np.float64)
  dropped = np.all(out == 0, axis=(1, 2, 3)) & np.any(inputs != 0, axis=(1, 2, 3))
  kept = ~dropped
  np.testing.assert_allclose(out[kept], inputs[kept] / (1 - 0.6), rtol=1e-5, atol=1e-6)
  assert 24 <= dropped.sum() <= 52  # Binomial(64, 0.6): mean 38.4, sd 3.9.


def test_dropout_before_the_head_drops_units_at_the_given_rate():
  config = tiny.get_config()
  config.model.dropout_rate = 0.25
  x = jax.random.normal(jax.random.key(3), (64, 32, 32, 3))
  calls, _ = _calls(config, x, nn.Dropout, train=True)
  ((module, inputs, out),) = [c for c in calls if c[0].broadcast_dims == ()]
  assert module.rate == 0.25
  inputs, out = np.asarray(inputs, np.float64), np.asarray(out, np.float64)
  live = inputs != 0  # Units ReLU left at zero say nothing about dropout.
  zeroed = live & (out == 0)
  np.testing.assert_allclose(out[~zeroed], inputs[~zeroed] / 0.75, rtol=1e-5, atol=1e-6)
  assert live.sum() > 500
  assert 0.18 < zeroed.sum() / live.sum() < 0.32  # Binomial: sd < 0.02.


@pytest.mark.parametrize('impl', ['plain', 'rows'])
def test_every_attention_layer_runs_the_form_the_config_names(impl, monkeypatch):
  used = forms.record_forms_used(monkeypatch, ('plain', 'rows'))
  config = tiny.get_config()
  config.model.attention_impl = impl
  network = networks.create_model(config)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  jax.eval_shape(lambda x: network.init(jax.random.key(0), x, train=False), images)
  assert len(used) == 4 and set(used) == {impl}  # The four stages' attention layers.
