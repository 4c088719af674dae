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

from halonet.models.mixers.cond_conv import CondConv
from halonet.models.mixers.conv import Conv3x3
from halonet.models.mixers.dynamic_conv import DynamicConv
from halonet.models.mixers.global_attention import GlobalAttention
from halonet.models.mixers.sasa import LocalAttention
from halonet.models.mixers.selective_kernel import SelectiveKernel
from halonet.models.mixers.split_attention import SplitAttention

NAMES = ('conv', 'halo', 'sasa', 'global', 'sk', 'split', 'condconv', 'dynamic')
# Mixers that end with their own BatchNorm and activation (as SKNet's and ResNeSt's blocks
# build them): the block adds none after them.
NORMALIZED = ('sk', 'split')
# Mixers that attend (halo attention underneath): they need heads that divide their widths.
ATTENTION = ('halo', 'sasa', 'global')

__all__ = [
  'NAMES',
  'NORMALIZED',
  'ATTENTION',
  'CondConv',
  'Conv3x3',
  'DynamicConv',
  'GlobalAttention',
  'LocalAttention',
  'SelectiveKernel',
  'SplitAttention',
]
