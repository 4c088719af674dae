"""Downsampling after a stride-1 mixer, as SASA and BoTNet stride their attention layers."""

import flax.linen as nn
import jax


def downsample(x: jax.Array, stride: int) -> jax.Array:
  """A stride x stride mean, padded so an odd map gives ceil(H / stride) rows (pads not counted),
  like a strided conv; stride 1 leaves x alone."""
  if stride == 1:
    return x
  pad = [(0, -size % stride) for size in x.shape[1:3]]
  # The divisor (pads not counted) is float32: without the cast a bfloat16 map comes out float32.
  mean = nn.avg_pool(x, (stride, stride), (stride, stride), pad, count_include_pad=False)
  return mean.astype(x.dtype)
