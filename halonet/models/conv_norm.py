"""The conv unit of timm's networks, used wherever a module here matches one of timm's: a k x k
conv without bias and with timm's symmetric padding, the network's BatchNorm, an optional
activation. Its parameters are 'conv' and 'bn', as timm's ConvNormAct names them."""

from collections.abc import Callable
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.models import grouped_conv

# config.model.activation's names (HaloNet) and timm's (its networks' own setting).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {'relu': nn.relu, 'silu': nn.silu}


def batch_norm(train: bool, dtype: Any) -> Callable[..., nn.BatchNorm]:
  """The BatchNorm every network here uses (momentum 0.9, epsilon 1e-5: timm's and the paper's
  ResNet defaults), built once per call of the network for train or eval."""
  return functools.partial(
    nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
  )


class ConvNormAct(nn.Module):
  """conv (kernel, stride, dilation, groups) -> norm -> act (None: none)."""

  features: int
  kernel: int
  norm: Callable[..., nn.Module]
  stride: int = 1
  dilation: int = 1
  groups: int = 1
  act: Callable[[jax.Array], jax.Array] | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((self.stride - 1) + self.dilation * (self.kernel - 1)) // 2
    x = nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      strides=self.stride,
      padding=((pad, pad), (pad, pad)),
      kernel_dilation=self.dilation,
      feature_group_count=self.groups,
      use_bias=False,
      dtype=self.dtype,
      # Data-parallel grouped convs run per device (halonet/models/grouped_conv.py says why).
      conv_general_dilated=grouped_conv.grouped_conv if self.groups > 1 else None,
      name='conv',
    )(x)
    x = self.norm(name='bn')(x)
    return self.act(x) if self.act else x
