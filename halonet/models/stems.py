"""The network's stem (config.model.stem), by name: what turns the image into stage 1's map at
stride 4 and width 64. Each entry adds its layers to the calling network under the names its
checkpoints and timm's weights use ('stem_conv'/'stem_bn', 'stem_attention', 'stem_deep').

  'conv'              the ResNet 7x7/2 conv, BatchNorm, ReLU and 3x3/2 max-pool (HaloNet's)
  'sasa'              SASA's position-aware attention stem (sasa_stem.py)
  'deep', 'tiered'    the three-conv stems of timm's 'd' and 't' ResNets (deep_stem.py)
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from halonet import errors
from halonet.models import deep_stem
from halonet.models import sasa_stem

# (network, images, norm, dtype) -> stage 1's input; of the network, num_heads and attention.
Stem = Callable[[Any, jax.Array, Callable[..., nn.Module], Any], jax.Array]


def _conv(net: Any, x: jax.Array, norm: Callable[..., nn.Module], dtype: Any) -> jax.Array:
  x = nn.Conv(
    64, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False, dtype=dtype, name='stem_conv'
  )(x)
  x = nn.relu(norm(name='stem_bn')(x))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _sasa(net: Any, x: jax.Array, norm: Callable[..., nn.Module], dtype: Any) -> jax.Array:
  return sasa_stem.AttentionStem(
    width=64,
    num_heads=net.num_heads[0],
    norm=norm,
    attention=net.attention,
    dtype=dtype,
    name='stem_attention',
  )(x)


def _deep(kind: str) -> Stem:
  return lambda net, x, norm, dtype: deep_stem.DeepStem(
    kind=kind, norm=norm, dtype=dtype, name='stem_deep'
  )(x)


STEMS: dict[str, Stem] = {'conv': _conv, 'sasa': _sasa, **{k: _deep(k) for k in deep_stem.WIDTHS}}


def build(name: str) -> Stem:
  """The stem `name` names; an unknown name is an error, never a silent default."""
  if name not in STEMS:
    raise errors.ConfigError(f'stem={name!r} is not one of {list(STEMS)}')
  return STEMS[name]
