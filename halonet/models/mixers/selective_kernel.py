"""Selective Kernel convolution (Li et al. 2019) as timm's SelectiveKernel: parallel conv paths of
different receptive fields (3x3 with dilation (k - 1) / 2 standing in for a k x k kernel), each
conv-BN-act on its share of the input channels, mixed per channel by a softmax over the paths
computed from their pooled sum. Submodule names follow timm's (paths.N -> paths_N)."""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.models import conv_norm
from halonet.rounding import make_divisible


class SelectKernelAttention(nn.Module):
  """timm's SelectiveKernelAttn: [B, paths, H, W, C] -> per-path channel weights summing to 1."""

  norm: Callable[..., nn.Module]
  hidden: int
  dtype: Any

  @nn.compact
  def __call__(self, paths: jax.Array) -> jax.Array:
    num_paths, channels = paths.shape[1], paths.shape[-1]
    s = paths.sum(axis=1).mean(axis=(1, 2))
    s = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name='fc_reduce')(s)
    s = nn.relu(self.norm(name='bn')(s))
    s = nn.Dense(channels * num_paths, use_bias=False, dtype=self.dtype, name='fc_select')(s)
    return jax.nn.softmax(s.reshape(-1, num_paths, 1, 1, channels).astype(jnp.float32), axis=1)


class SelectiveKernel(nn.Module):
  """Ends with its own BatchNorm and activation (per path), as in timm's SK bottleneck."""

  value_width: int
  stride: int
  norm: Callable[..., nn.Module]
  act: Callable[[jax.Array], jax.Array]
  kernels: Sequence[int] = (3, 5)
  ratio: float = 1 / 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    splits = jnp.split(x, len(self.kernels), axis=-1)  # timm's split_input: a share per path.
    paths = jnp.stack(
      [
        # A 3x3 conv dilated by (k - 1) // 2 covers k x k, as SKNet's paths do.
        conv_norm.ConvNormAct(
          self.value_width,
          3,
          self.norm,
          stride=self.stride,
          dilation=(k - 1) // 2,
          act=self.act,
          dtype=self.dtype,
          name=f'paths_{i}',
        )(part)
        for i, (k, part) in enumerate(zip(self.kernels, splits))
      ],
      axis=1,
    )
    hidden = make_divisible(self.value_width * self.ratio, 8)
    weights = SelectKernelAttention(self.norm, hidden, self.dtype, name='attn')(paths)
    return (paths * weights.astype(paths.dtype)).sum(axis=1)
