"""timm's tensors in the Flax layouts (halonet/tools/convert.py), checked without torch against
the definitions of PyTorch's layers written in NumPy: a mistake in a layout shows here even
where torch and timm are not installed (test_timm_parity.py checks whole networks with them)."""

from flax import traverse_util
import jax
import numpy as np

from halonet.models import networks
from halonet.tools import convert

RNG = np.random.default_rng(0)
ATOL = 1e-5  # JAX's convolutions run in float32; a wrong layout is off by O(1).


def _torch_conv2d(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
  """PyTorch's Conv2d (a cross-correlation, no padding) of x [H, W, I], weight [O, I, kh, kw]."""
  out, _, kh, kw = weight.shape
  rows, cols = x.shape[0] - kh + 1, x.shape[1] - kw + 1
  y = np.zeros((rows, cols, out))
  for i in range(kh):
    for j in range(kw):
      y += np.einsum('hwi,oi->hwo', x[i : i + rows, j : j + cols], weight[:, :, i, j])
  return y


def _flax_conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """flax.linen.Conv's computation (HWIO kernel, NHWC maps), VALID padding."""
  return np.asarray(
    jax.lax.conv_general_dilated(
      x[None], kernel, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )[0]
  )


def test_a_conv_kernel_computes_what_timms_conv_computes():
  x, weight = RNG.normal(size=(6, 7, 3)), RNG.normal(size=(4, 3, 3, 2))  # Kernel 3 x 2.
  kernel = convert._to_flax(weight, (3, 2, 3, 4), ('stem_conv1', 'conv', 'kernel'))
  np.testing.assert_allclose(_flax_conv(x, kernel), _torch_conv2d(x, weight), atol=ATOL)


def test_a_projection_and_a_linear_layer_compute_what_timms_compute():
  x = RNG.normal(size=(5, 6))
  one_by_one, linear = RNG.normal(size=(4, 6, 1, 1)), RNG.normal(size=(4, 6))
  kernel = convert._to_flax(one_by_one, (6, 4), ('stage1_block0', 'conv1', 'kernel'))
  np.testing.assert_allclose(x @ kernel, x @ one_by_one[:, :, 0, 0].T, atol=ATOL)
  kernel = convert._to_flax(linear, (6, 4), ('head', 'kernel'))
  np.testing.assert_allclose(x @ kernel, x @ linear.T, atol=ATOL)  # nn.Linear: x W^T.


def test_a_head_projection_keeps_timms_head_order():
  """timm's 1x1 conv gives heads * width channels, head by head: [in, heads, width] here."""
  heads, width, x = 3, 4, RNG.normal(size=(2, 5))
  weight = RNG.normal(size=(heads * width, 5, 1, 1))
  kernel = convert._to_flax(weight, (5, heads, width), ('stage1_block0', 'query', 'kernel'))
  timm = (x @ weight[:, :, 0, 0].T).reshape(2, heads, width)
  np.testing.assert_allclose(np.einsum('bc,chw->bhw', x, kernel), timm, atol=ATOL)


def test_ecas_conv1d_and_the_lambda_layers_conv3d_compute_what_timms_compute():
  eca = RNG.normal(size=(1, 1, 5))  # Conv1d(1, 1, 5) across channels.
  kernel = convert._to_flax(eca, (5, 1, 1), ('stage1_block0', 'attn', 'kernel'))
  channels = RNG.normal(size=12)
  timm = np.correlate(channels, eca[0, 0], mode='valid')
  flax = jax.lax.conv_general_dilated(
    channels[None, :, None], kernel, (1,), 'VALID', dimension_numbers=('NWC', 'WIO', 'NWC')
  )
  np.testing.assert_allclose(np.asarray(flax)[0, :, 0], timm, atol=ATOL)

  positions = RNG.normal(size=(4, 1, 3, 3, 1))  # Conv3d(1, k=4, (3, 3, 1)) over [H, W, v].
  kernel = convert._to_flax(positions, (3, 3, 1, 4), ('stage2_block1', 'conv_lambda', 'kernel'))
  values = RNG.normal(size=(6, 5, 1))
  np.testing.assert_allclose(
    _flax_conv(values, kernel), _torch_conv2d(values, positions[..., 0]), atol=ATOL
  )


def test_botnets_one_qkv_conv_becomes_each_heads_query_key_and_value():
  """timm's BottleneckAttn: all heads' q, then all k, then all v, head by head in each; here a
  query projection and a key-value one whose every head holds its key, then its value."""
  heads, qk, v, channels = 2, 3, 4, 5
  planned = {
    ('params', ('stage3_block0', 'self_attn', 'query', 'kernel')): (
      'stages.2.0.self_attn.q.weight',
      (channels, heads, qk),
    ),
    ('params', ('stage3_block0', 'self_attn', 'key_value', 'kernel')): (
      'stages.2.0.self_attn.kv.weight',
      (channels, heads, qk + v),
    ),
  }
  qkv = RNG.normal(size=(heads * (2 * qk + v), channels, 1, 1))
  state = convert._split_qkv({'stages.2.0.self_attn.qkv.weight': qkv}, planned)
  assert sorted(state) == ['stages.2.0.self_attn.kv.weight', 'stages.2.0.self_attn.q.weight']
  (path_q, (key_q, shape_q)), (path_kv, (key_kv, shape_kv)) = planned.items()
  query = convert._to_flax(state[key_q], shape_q, path_q[1])
  key_value = convert._to_flax(state[key_kv], shape_kv, path_kv[1])
  x = RNG.normal(size=channels)
  q, k, val = np.split(qkv[:, :, 0, 0] @ x, [heads * qk, 2 * heads * qk])  # timm's split.
  np.testing.assert_allclose(np.einsum('c,chw->hw', x, query), q.reshape(heads, qk), atol=ATOL)
  keys_and_values = np.einsum('c,chw->hw', x, key_value)
  np.testing.assert_allclose(keys_and_values[:, :qk], k.reshape(heads, qk), atol=ATOL)
  np.testing.assert_allclose(keys_and_values[:, qk:], val.reshape(heads, v), atol=ATOL)


def _timm_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape timm's state dict holds for the Flax variable at `path` (PyTorch's layouts)."""
  if path[-1] != 'kernel':
    return shape
  if len(shape) == 4:  # Conv: HWIO <- OIHW.
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 3 and path[-2] == 'attn':  # ECA's Conv1d(1, 1, k).
    return (1, 1, shape[0])
  if len(shape) == 3:  # A head projection [in, heads, width] <- a 1x1 conv.
    return (shape[1] * shape[2], shape[0], 1, 1)
  if 'head' in path:  # nn.Linear [out, in].
    return (shape[1], shape[0])
  return (shape[1], shape[0], 1, 1)  # A 1x1 conv as a projection.


def test_the_converted_position_tables_give_timms_unscaled_position_logits():
  """timm's HaloAttn (scale_pos_embed=False) adds q.r to its logits unscaled, the layer adds
  (q / sqrt(d)).r: for any query, each converted table gives timm's position logits."""
  name = 'haloregnetz_b'
  abstract = networks.abstract_variables(convert.model_config(name))
  state = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in traverse_util.flatten_dict(abstract[collection]).items():
      prefix, last = convert._torch_name(path)
      state[f'{prefix}.{last}'] = RNG.normal(size=_timm_shape(path, leaf.shape)).astype(np.float32)
  converted = traverse_util.flatten_dict(convert.convert(name, state, abstract)['params'])
  tables = {p: v for p, v in converted.items() if p[-1] in ('relative_height', 'relative_width')}
  assert len(tables) == 2 * 5  # Its five halo blocks, a height and a width table each.
  for path, ours in tables.items():
    timm = state['.'.join(convert._torch_name(path))]
    query = RNG.normal(size=timm.shape[-1])
    np.testing.assert_allclose(
      ours @ (query / np.sqrt(len(query))), timm @ query, rtol=1e-5, atol=ATOL
    )
