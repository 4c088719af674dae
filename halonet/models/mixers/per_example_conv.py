"""A k x k convolution whose kernel differs per example (CondConv, Dynamic Convolution), as one
batched contraction over the input's shifted views: batch-parallel like a dense layer, where a
convolution with the batch folded into groups would gather the batch under data parallelism."""

import jax
import jax.numpy as jnp

from halonet.models import grouped_conv


def per_example_conv(x: jax.Array, kernels: jax.Array, stride: int) -> jax.Array:
  """x [B, H, W, I] with kernels [B, k, k, I, O] (symmetric padding) -> [B, H', W', O]."""
  batch, k, _, channels, out = kernels.shape
  pad = ((stride - 1) + (k - 1)) // 2
  out_hw = [(size + 2 * pad - k) // stride + 1 for size in x.shape[1:3]]
  views = grouped_conv.shifted_views(x, (k, k), (stride, stride), ((pad, pad), (pad, pad)), out_hw)
  return jnp.einsum(
    'bhwtc,btco->bhwo', views, kernels.reshape(batch, k * k, channels, out).astype(x.dtype)
  )
