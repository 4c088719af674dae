"""Every HaloAttention implementation against an explicit per-query NumPy reference and each other,
and the layer's symmetry properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halonet.attention import IMPLEMENTATIONS
from halonet.attention import AttentionPlan
from halonet.attention import HaloAttention
from tests import forms


def naive_halo_attention(x, params, *, heads, block, halo, stride, mask_window=0):
  """Loops over every output pixel: softmax over the real pixels of its block's neighbourhood.

  Written from the paper's definition, independent of the layer's blocked implementation.
  """
  x = np.asarray(x, np.float64)
  wq = np.asarray(params['query']['kernel'], np.float64)  # [C, heads, dk]
  wkv = np.asarray(params['key_value']['kernel'], np.float64)  # [C, heads, dk + dv]
  rel_h = np.asarray(params['relative_height'], np.float64)  # [2(b+h)-1, dk]
  rel_w = np.asarray(params['relative_width'], np.float64)
  dk = wq.shape[-1]
  dv = wkv.shape[-1] - dk
  batch, height, width, _ = x.shape
  out_h, out_w = -(-height // stride), -(-width // stride)
  out = np.zeros((batch, out_h, out_w, heads * dv))
  for n in range(batch):
    for oy in range(out_h):
      for ox in range(out_w):
        qy, qx = oy * stride, ox * stride
        top, left = (qy // block) * block - halo, (qx // block) * block - halo
        keys = [
          (ky, kx)
          for ky in range(top, top + block + 2 * halo)
          for kx in range(left, left + block + 2 * halo)
          if 0 <= ky < height
          and 0 <= kx < width
          and (
            not mask_window
            or (abs(ky - qy) <= mask_window // 2 and abs(kx - qx) <= mask_window // 2)
          )
        ]
        for head in range(heads):
          q = x[n, qy, qx] @ wq[:, head] / np.sqrt(dk)
          logits, values = [], []
          for ky, kx in keys:
            kv = x[n, ky, kx] @ wkv[:, head]
            offset_y = ky - qy + block + halo - 1
            offset_x = kx - qx + block + halo - 1
            logits.append(q @ kv[:dk] + q @ rel_h[offset_y] + q @ rel_w[offset_x])
            values.append(kv[dk:])
          logits = np.array(logits)
          p = np.exp(logits - logits.max())
          p /= p.sum()
          out[n, oy, ox, head * dv : (head + 1) * dv] = p @ np.array(values)
  return out


def _params(layer, x):
  params = layer.init(jax.random.key(1), x)['params']
  # Non-trivial relative tables, so the position terms are tested too.
  params['relative_height'] = jax.random.normal(jax.random.key(2), params['relative_height'].shape)
  params['relative_width'] = jax.random.normal(jax.random.key(3), params['relative_width'].shape)
  return params


def _layer_and_params(x, **kwargs):
  layer = HaloAttention(**kwargs)
  return layer, _params(layer, x)


CASES = [
  # (height, width, channels, qk, value, heads, block, halo, stride, mask)
  dict(hw=(8, 8), c=8, qk=8, v=8, heads=2, block=4, halo=1, stride=1),
  dict(hw=(8, 8), c=8, qk=8, v=12, heads=2, block=4, halo=2, stride=2),
  dict(hw=(7, 10), c=6, qk=8, v=8, heads=4, block=4, halo=1, stride=1),  # b does not divide.
  dict(hw=(9, 7), c=6, qk=8, v=8, heads=1, block=4, halo=2, stride=2),  # odd sizes, stride 2.
  dict(hw=(6, 6), c=4, qk=4, v=4, heads=2, block=3, halo=0, stride=1),  # no halo.
  dict(hw=(10, 10), c=8, qk=8, v=8, heads=2, block=4, halo=2, stride=1, mask=3),
  dict(hw=(10, 10), c=8, qk=8, v=8, heads=2, block=4, halo=2, stride=2, mask=5),
  dict(hw=(3, 3), c=4, qk=4, v=4, heads=2, block=4, halo=1, stride=2),  # map smaller than b.
  # 3 rows of blocks per image, whose strips overlap in the row loop's backward pass.
  dict(hw=(10, 7), c=6, qk=8, v=8, heads=2, block=4, halo=1, stride=2),
  dict(hw=(10, 7), c=6, qk=8, v=8, heads=2, block=4, halo=1, stride=1),
]
IMPLS = sorted(IMPLEMENTATIONS)


def _case_layer(case, impl):
  """The case's layer with `impl`; its parameters come from `_case_inputs`."""
  return HaloAttention(
    qk_width=case['qk'],
    value_width=case['v'],
    num_heads=case['heads'],
    block_size=case['block'],
    halo_size=case['halo'],
    stride=case['stride'],
    mask_window=case.get('mask', 0),
    attention=AttentionPlan(impl),
  )


def _case_layer_and_params(case, x, impl):
  layer = _case_layer(case, impl)
  return layer, _params(layer, x)


def _case_naive(case, x, params):
  return naive_halo_attention(
    x,
    params,
    heads=case['heads'],
    block=case['block'],
    halo=case['halo'],
    stride=case['stride'],
    mask_window=case.get('mask', 0),
  )


@functools.cache
def _case_inputs(index: int):
  """CASES[index]'s input and parameters (initialised by the plain form: every form has the
  same parameters), shared by every form's test of the case."""
  case = CASES[index]
  x = jax.random.normal(jax.random.key(0), (2, *case['hw'], case['c']))
  return x, _case_layer_and_params(case, x, 'plain')[1]


@functools.cache
def _case_naive_output(index: int) -> np.ndarray:
  """The float64 reference's output for CASES[index], computed once for every form."""
  return _case_naive(CASES[index], *_case_inputs(index))


@functools.cache
def _case_naive_derivatives(index: int):
  """Central differences of the float64 reference for CASES[index], computed once for every
  form: the cotangent, then (input name, direction, derivative) for one random direction per
  input (x, each kernel, each position table)."""
  case, (x, params) = CASES[index], _case_inputs(index)
  cotangent = np.asarray(jax.random.normal(jax.random.key(4), _case_naive_output(index).shape))
  inputs, treedef = jax.tree_util.tree_flatten_with_path((params, x))
  inputs = [(jax.tree_util.keystr(path), np.asarray(leaf, np.float64)) for path, leaf in inputs]

  def naive(leaves):
    p, x = jax.tree_util.tree_unflatten(treedef, leaves)
    return (_case_naive(case, x, p) * cotangent).sum()

  rng = np.random.default_rng(0)
  eps = 1e-6
  derivatives = []
  for i, (name, leaf) in enumerate(inputs):
    direction = rng.normal(size=leaf.shape)
    shifted = lambda sign: naive(
      [leaf + sign * eps * direction if j == i else other for j, (_, other) in enumerate(inputs)]
    )
    derivatives.append((name, direction, (shifted(1) - shifted(-1)) / (2 * eps)))
  return cotangent, derivatives


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('index', range(len(CASES)), ids=lambda i: str(CASES[i]))
def test_matches_naive_reference(index, impl):
  x, params = _case_inputs(index)
  layer = _case_layer(CASES[index], impl)
  got = forms.jit(layer.apply, impl)({'params': params}, x)
  want = _case_naive_output(index)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


GRADIENT_CASES = (0, 1, 2, 3, 4, 6, 8, 9)  # Indices into CASES.


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('index', GRADIENT_CASES, ids=lambda i: str(CASES[i]))
def test_gradients_match_finite_differences_of_naive_reference(index, impl):
  """Gradients (autodiff, or the row loop's hand-written backward) against central differences
  of the float64 reference.

  One direction per input (x, each kernel, each position table), so a wrong gradient of any one
  of them is caught.
  """
  x, params = _case_inputs(index)
  layer = _case_layer(CASES[index], impl)
  cotangent, derivatives = _case_naive_derivatives(index)
  loss = lambda p, x: (layer.apply({'params': p}, x) * cotangent).sum()
  grads = jax.tree_util.tree_leaves(forms.jit(jax.grad(loss, argnums=(0, 1)), impl)(params, x))
  assert len(grads) == len(derivatives)
  for (name, direction, numeric), grad in zip(derivatives, grads):
    analytic = np.sum(np.asarray(grad, np.float64) * direction)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-4, atol=2e-4, err_msg=name)


@pytest.mark.parametrize('impl', IMPLS)
def test_gradients_finite_with_masks_and_padding(impl):
  x = jax.random.normal(jax.random.key(0), (1, 9, 9, 8))
  layer, params = _layer_and_params(
    x,
    qk_width=8,
    value_width=8,
    num_heads=2,
    block_size=4,
    halo_size=2,
    stride=2,
    mask_window=3,
    attention=AttentionPlan(impl),
  )
  grads = jax.grad(lambda p, x: layer.apply({'params': p}, x).sum(), argnums=(0, 1))(params, x)
  for g in jax.tree_util.tree_leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
    assert np.abs(np.asarray(g)).max() > 0


AGREE_KWARGS = dict(qk_width=16, value_width=24, num_heads=4, block_size=8, halo_size=3)
AGREE_TOLERANCES = ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2))


def _forward_and_gradients(layer, params, x, cotangent):
  loss = lambda p, x: (layer.apply({'params': p}, x).astype(jnp.float32) * cotangent).sum()
  return forms.jit(
    lambda p, x: (layer.apply({'params': p}, x).astype(jnp.float32), jax.grad(loss, (0, 1))(p, x)),
    layer.attention.default,
  )(params, x)


@functools.cache
def _plain_results(stride: int):
  """The plain form's case of test_implementations_agree, computed once for every other form:
  (params, x, cotangent, {dtype: (forward, gradients)})."""
  x = jax.random.normal(jax.random.key(0), (3, 21, 13, 16))
  plain, params = _layer_and_params(
    x, **AGREE_KWARGS, stride=stride, attention=AttentionPlan('plain')
  )
  cotangent = jax.random.normal(jax.random.key(5), plain.apply({'params': params}, x).shape)
  results = {
    dtype: _forward_and_gradients(plain.clone(dtype=dtype), params, x, cotangent)
    for dtype, _ in AGREE_TOLERANCES
  }
  return params, x, cotangent, results


@pytest.mark.parametrize('impl', [i for i in IMPLS if i != 'plain'])
@pytest.mark.parametrize('stride', [1, 2])
def test_implementations_agree(impl, stride):
  """Each implementation against the plain one on a larger map (H1-like b=8, h=3, 3 x 2 blocks
  that b does not divide), forward and gradients, float32 and bfloat16."""
  params, x, cotangent, plain_results = _plain_results(stride)
  other = HaloAttention(**AGREE_KWARGS, stride=stride, attention=AttentionPlan(impl))
  for dtype, tol in AGREE_TOLERANCES:
    results = [
      plain_results[dtype],
      _forward_and_gradients(other.clone(dtype=dtype), params, x, cotangent),
    ]
    scale = jax.tree.map(lambda a: float(np.abs(np.asarray(a, np.float32)).max()), results[0])
    jax.tree.map(
      lambda a, b, s: np.testing.assert_allclose(
        np.asarray(b, np.float32), np.asarray(a, np.float32), atol=tol * s, rtol=0
      ),
      results[0],
      results[1],
      scale,
    )


def test_rows_bfloat16_gradient_with_a_single_row_of_blocks():
  """One image with one row of blocks and heads wider than 1: the case whose bfloat16 gradient
  XLA:CPU once failed to run (an unfused BF16 x BF16 = F32 product); checked against plain."""
  x = jax.random.normal(jax.random.key(0), (1, 4, 15, 6))
  kwargs = dict(qk_width=6, value_width=6, num_heads=2, block_size=4, halo_size=0)
  plain, params = _layer_and_params(x, **kwargs, attention=AttentionPlan('plain'))
  rows = HaloAttention(**kwargs, attention=AttentionPlan('rows'), dtype=jnp.bfloat16)
  grad = lambda layer: jax.jit(
    jax.grad(lambda p, x: layer.apply({'params': p}, x).astype(jnp.float32).sum(), argnums=(0, 1))
  )
  expected, got = grad(plain)(params, x), grad(rows)(params, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(b, np.float32), np.asarray(a), atol=3e-2 * float(np.abs(a).max()), rtol=0
    ),
    expected,
    got,
  )


@pytest.mark.parametrize('impl', IMPLS)
def test_bfloat16_compute_close_to_float32(impl):
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8))
  kwargs = dict(
    qk_width=8, value_width=8, num_heads=2, block_size=4, halo_size=1, attention=AttentionPlan(impl)
  )
  layer32, params = _layer_and_params(x, **kwargs)
  out32 = layer32.apply({'params': params}, x)
  out16 = HaloAttention(**kwargs, dtype=jnp.bfloat16).apply({'params': params}, x)
  assert out16.dtype == jnp.bfloat16
  assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=0.1)


def _shift_rows(x, shift):
  return jnp.zeros_like(x).at[:, shift:].set(x[:, :-shift])


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('stride', [1, 2])
def test_equivariant_to_shifts_of_one_block_only(stride, impl):
  block, halo, height = 4, 1, 24
  x = jax.random.normal(jax.random.key(0), (1, height, 8, 4))
  layer, params = _layer_and_params(
    x,
    qk_width=4,
    value_width=4,
    num_heads=2,
    block_size=block,
    halo_size=halo,
    stride=stride,
    attention=AttentionPlan(impl),
  )
  out = layer.apply({'params': params}, x)
  # Output rows whose neighbourhood lies inside the image both before and after the shift.
  rows = [
    y
    for y in range(out.shape[1])
    if (y * stride // block) * block - halo >= 0
    and (y * stride // block) * block + block + halo <= height - block
  ]
  assert len(rows) >= block
  shifted = layer.apply({'params': params}, _shift_rows(x, block))
  step = block // stride
  np.testing.assert_allclose(
    np.asarray(shifted[:, [y + step for y in rows]]), np.asarray(out[:, rows]), atol=1e-5
  )
  # A 1-pixel shift (stride 1) regroups the blocks, so the output is not simply shifted.
  if stride == 1:
    shifted_1 = layer.apply({'params': params}, _shift_rows(x, 1))
    diff = np.abs(np.asarray(shifted_1[:, [y + 1 for y in rows]]) - np.asarray(out[:, rows]))
    assert diff.max() > 1e-2


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(block_size=0), 'block_size=0'),
    (dict(halo_size=-1), 'halo_size=-1'),
    (dict(stride=3), 'stride=3'),
    (dict(num_heads=3), 'num_heads=3'),
    (dict(block_size=3, stride=2), 'block_size=3'),
    (dict(mask_window=4), 'mask_window=4'),
    (dict(mask_window=5, halo_size=1), 'mask_window=5'),
    (dict(position_indexing='timm'), "position_indexing='timm'"),
  ],
)
def test_bad_arguments_name_the_value(kwargs, message):
  args = dict(qk_width=8, value_width=8, num_heads=2, block_size=4, halo_size=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    HaloAttention(**args).init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)))


def test_a_plan_naming_no_form_is_refused_in_one_line():
  with pytest.raises(ValueError, match="attention form 'fast' is not one of"):
    AttentionPlan('fast')
  with pytest.raises(ValueError, match="attention form 'fast'"):
    AttentionPlan('plain', (('16x16x8 qk8 v8 heads2 b4 h1 s1 mask0 float32', 'fast'),))


def test_dense_form_folds_positions_and_masks_into_the_dot_product(monkeypatch):
  """`dense` hands the fused attention no bias (a logits-sized array per block): the position
  terms and masks ride in the queries' and keys' channels, and it still equals plain's output."""
  from halonet.attention import dense  # pylint: disable=import-outside-toplevel

  calls = []
  real = jax.nn.dot_product_attention

  def spy(query, key, value, *args, **kwargs):
    calls.append((query.shape, key.shape, args, kwargs))
    return real(query, key, value, *args, **kwargs)

  case = dict(hw=(10, 10), c=8, qk=8, v=8, heads=2, block=4, halo=2, stride=1, mask=3)
  x = jax.random.normal(jax.random.key(0), (2, *case['hw'], case['c']))
  layer, params = _case_layer_and_params(case, x, 'dense')
  monkeypatch.setattr(dense.jax.nn, 'dot_product_attention', spy)
  got = layer.apply({'params': params}, x)
  want = _case_layer(case, 'plain').apply({'params': params}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  ((query, key, args, kwargs),) = calls
  window = case['block'] + 2 * case['halo']
  # 3 x 3 blocks of 2 images; 16 queries, 64 keys; 4 channels a head + 8 row + 8 column places.
  assert query == (18, 16, 2, 4 + 2 * window) and key == (18, window**2, 2, 4 + 2 * window)
  assert not args and kwargs.get('bias') is None and kwargs.get('mask') is None
