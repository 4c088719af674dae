"""The feature pyramid (Lin et al. 2017, "Feature Pyramid Networks for Object Detection") over a
backbone's four stages (strides 4-32): P2-P5 of one width from lateral 1x1 convs, a top-down path
of nearest upsampling and 3x3 output convs, and P6 subsampled from P5 for the RPN's largest
anchors, as torchvision's FeaturePyramidNetwork with LastLevelMaxPool."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

# kaiming_uniform(a=1), as torchvision initialises the pyramid's convs.
CONV_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
LEVELS = ('p2', 'p3', 'p4', 'p5', 'p6')


def upsample_nearest(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """[B, h, w, C] -> [B, height, width, C], output pixel i reading input floor(i * h / height)
  (PyTorch's 'nearest'), so odd sizes line up as they do there."""
  rows = jnp.floor(jnp.arange(height) * (x.shape[1] / height)).astype(jnp.int32)
  cols = jnp.floor(jnp.arange(width) * (x.shape[2] / width)).astype(jnp.int32)
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """{'p2'..'p6': [B, ceil(H / stride), ..., width]} from the stages [C2, C3, C4, C5]."""

  width: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, stages: Sequence[jnp.ndarray]) -> dict[str, jnp.ndarray]:
    conv = lambda size, name: nn.Conv(
      self.width, (size, size), padding='SAME', kernel_init=CONV_INIT, dtype=self.dtype, name=name
    )
    inner = conv(1, f'lateral{len(stages) + 1}')(stages[-1])
    outputs = [conv(3, f'output{len(stages) + 1}')(inner)]
    for level in range(len(stages) - 1, 0, -1):  # C4, C3, C2 (levels 4, 3, 2).
      lateral = conv(1, f'lateral{level + 1}')(stages[level - 1])
      inner = lateral + upsample_nearest(inner, lateral.shape[1], lateral.shape[2])
      outputs.insert(0, conv(3, f'output{level + 1}')(inner))
    outputs.append(outputs[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2).
    return dict(zip(LEVELS, outputs))
