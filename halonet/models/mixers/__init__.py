"""The spatial mixer of a bottleneck block (config.model.mixers, one name per stage): a module
mixer(value_width=, stride=)(x) -> [B, H / stride, W / stride, value_width]; the network binds the
rest of its fields (widths, heads, windows, norm, dtype) per stage.

  conv.py               'conv'       the ResNet 3x3 convolution
  (attention/)          'halo'       HaloNet's blocked local attention (attention.HaloAttention)
  sasa.py               'sasa'       SASA's centred k x k window attention
  global_attention.py   'global'     BoTNet's global multi-head self-attention
  selective_kernel.py   'sk'         Selective Kernel convolution (SKNet)
  split_attention.py    'split'      Split Attention (ResNeSt)
  cond_conv.py          'condconv'   CondConv: a per-example mixture of expert kernels
  dynamic_conv.py       'dynamic'    Dynamic Convolution: kernels aggregated by attention
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import flax.linen as nn

from halonet import errors
from halonet.models.mixers.cond_conv import CondConv
from halonet.models.mixers.conv import Conv3x3
from halonet.models.mixers.dynamic_conv import DynamicConv
from halonet.models.mixers.global_attention import GlobalAttention
from halonet.models.mixers.sasa import LocalAttention
from halonet.models.mixers.selective_kernel import SelectiveKernel
from halonet.models.mixers.split_attention import SplitAttention


class Stage(NamedTuple):
  """What a stage's mixer is built from besides the network's settings."""

  width: int  # The block's inner width: the queries' and keys' of an attention mixer.
  heads: int
  block_size: int
  halo_size: int
  norm: Callable[..., nn.Module]
  act: Callable[..., Any]
  dtype: Any


# Each name's constructor of a stage's mixer, from the network (its fields attention,
# attention_cls, mask_window, sasa_window, sk_kernels, radix, num_experts) and the stage.
MIXERS: dict[str, Callable[[Any, Stage], Callable[..., nn.Module]]] = {
  'conv': lambda net, s: functools.partial(Conv3x3, dtype=s.dtype),
  'halo': lambda net, s: functools.partial(
    net.attention_cls,
    qk_width=s.width,
    num_heads=s.heads,
    block_size=s.block_size,
    halo_size=s.halo_size,
    mask_window=net.mask_window,
    attention=net.attention,
    dtype=s.dtype,
  ),
  'sasa': lambda net, s: functools.partial(
    LocalAttention,
    qk_width=s.width,
    num_heads=s.heads,
    window=net.sasa_window,
    block_size=s.block_size,
    attention=net.attention,
    dtype=s.dtype,
  ),
  'global': lambda net, s: functools.partial(
    GlobalAttention, qk_width=s.width, num_heads=s.heads, attention=net.attention, dtype=s.dtype
  ),
  'sk': lambda net, s: functools.partial(
    SelectiveKernel, norm=s.norm, act=s.act, kernels=tuple(net.sk_kernels), dtype=s.dtype
  ),
  'split': lambda net, s: functools.partial(
    SplitAttention, norm=s.norm, act=s.act, radix=net.radix, dtype=s.dtype
  ),
  'condconv': lambda net, s: functools.partial(
    CondConv, num_experts=net.num_experts, dtype=s.dtype
  ),
  'dynamic': lambda net, s: functools.partial(
    DynamicConv, num_kernels=net.num_experts, dtype=s.dtype
  ),
}
NAMES = tuple(MIXERS)
# Mixers that end with their own BatchNorm and activation (as SKNet's and ResNeSt's blocks
# build them): the block adds none after them.
NORMALIZED = ('sk', 'split')
# Mixers that attend (halo attention underneath): they need heads that divide their widths.
ATTENTION = ('halo', 'sasa', 'global')


def build(name: str, net: Any, stage: Stage) -> Callable[..., nn.Module]:
  """The stage's mixer constructor, (value_width, stride) left to the block; an unknown name is
  an error, never a silent convolution."""
  if name not in MIXERS:
    raise errors.ConfigError(f'mixer {name!r} is not one of {list(MIXERS)}')
  return MIXERS[name](net, stage)


__all__ = [
  'ATTENTION',
  'MIXERS',
  'NAMES',
  'NORMALIZED',
  'Stage',
  'build',
  'CondConv',
  'Conv3x3',
  'DynamicConv',
  'GlobalAttention',
  'LocalAttention',
  'SelectiveKernel',
  'SplitAttention',
]
