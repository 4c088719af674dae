"""Grouped convolutions (timm's group-size-16 3x3 convs) that train fast and data-parallel.

Two faults of XLA's own grouped convolution, both in its kernel gradient:
  - with the batch split over devices, XLA gathers the whole batch's activations for it, so each
    convolution runs per device (`sharding.per_device_images`) and only the kernel gradient is
    summed over devices (in float32: XLA:CPU fails to compile that sum in bfloat16);
  - XLA:CPU computes it ~17x slower than a dense kernel gradient of the same size, so on CPU it
    is a contraction of the input's k x k shifted views with the output gradient instead
    (haloregnetz_b's forward and backward: 10x faster, bench/grouped_conv.py). TPU and GPU keep
    XLA's convolution (`jax.lax.platform_dependent` picks per platform when the step is lowered).
"""

import functools

import jax
import jax.numpy as jnp

from halonet import sharding

_LAYOUT = ('NHWC', 'HWIO', 'NHWC')


def shifted_views(x: jax.Array, kernel_shape, strides, padding, out_hw) -> jax.Array:
  """[B, H', W', kh * kw, C]: the input under each kernel tap, at the output positions (a conv
  as one contraction: also the per-example kernels of halonet/models/mixers/per_example_conv.py)."""
  kh, kw = kernel_shape[:2]
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  (sh, sw), (h, w) = strides, out_hw
  views = [
    x[:, i : i + sh * (h - 1) + 1 : sh, j : j + sw * (w - 1) + 1 : sw]
    for i in range(kh)
    for j in range(kw)
  ]
  return jnp.stack(views, axis=3)


def _xla_conv(x, kernel, strides, padding, groups):
  return jax.lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=_LAYOUT, feature_group_count=groups
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x, kernel, strides, padding, groups):
  return _xla_conv(x, kernel, strides, padding, groups)


def _cpu_conv_forward(x, kernel, strides, padding, groups):
  return _xla_conv(x, kernel, strides, padding, groups), (x, kernel)


def _cpu_conv_backward(strides, padding, groups, residuals, d_out):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, strides, padding, groups), x)
  (d_x,) = input_vjp(d_out)  # XLA's input gradient is as fast as its forward.
  kh, kw, per_group, out = kernel.shape
  b, h, w, _ = d_out.shape
  views = shifted_views(x, kernel.shape, strides, padding, (h, w))
  d_kernel = jnp.einsum(
    'bhwtgc,bhwgo->tcgo',
    views.reshape(b, h, w, kh * kw, groups, per_group),
    d_out.reshape(b, h, w, groups, out // groups),
    preferred_element_type=jnp.float32,
  )
  return d_x, d_kernel.reshape(kernel.shape).astype(kernel.dtype)


_cpu_conv.defvjp(_cpu_conv_forward, _cpu_conv_backward)


def grouped_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides,
  padding,
  *,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int,
  precision=None,
) -> jax.Array:
  """`jax.lax.conv_general_dilated` as `flax.linen.Conv` calls it (NHWC / HWIO), undilated."""
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    raise ValueError(f'grouped_conv takes no dilation, not {lhs_dilation}, {rhs_dilation}')
  del dimension_numbers, precision  # Flax's NHWC / HWIO (_LAYOUT); default precision.
  strides, padding = tuple(window_strides), tuple(tuple(p) for p in padding)

  def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    kernel = kernel.astype(rhs.dtype)
    return jax.lax.platform_dependent(
      x,
      kernel,
      cpu=lambda x, k: _cpu_conv(x, k, strides, padding, feature_group_count),
      default=lambda x, k: _xla_conv(x, k, strides, padding, feature_group_count),
    )

  return sharding.per_device_images(conv, batched=1)(lhs, rhs.astype(jnp.float32))
