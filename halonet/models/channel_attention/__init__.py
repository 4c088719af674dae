"""Channel attention after a bottleneck block's last BatchNorm, and BAM after a stage (the
vision-attention survey's modules: SE, ECA, CBAM, BAM, Gather-Excite). Each is a Flax module
(x) -> x of the same shape; those with BatchNorm take the network's `norm` partial (train or
eval) as a field.

  squeeze_excite.py   'se'                          SE (Hu et al.)
  eca.py              'eca'                         ECA-Net (Wang et al.)
  cbam.py             'cbam'                        CBAM's channel then spatial gates (Woo et al.)
  gather_excite.py    'ge_minus', 'ge', 'ge_plus'   Gather-Excite θ⁻, θ, θ⁺ (Hu et al.)
  bam.py              'bam' (config.model.stage_attention)   BAM (Park et al.)
"""

from collections.abc import Callable
import functools

import flax.linen as nn

from halonet.models.channel_attention.bam import Bam
from halonet.models.channel_attention.cbam import Cbam
from halonet.models.channel_attention.eca import EfficientChannelAttention
from halonet.models.channel_attention.gather_excite import GatherExcite
from halonet.models.channel_attention.squeeze_excite import SqueezeExcite

# config.model.channel_attention's names ('' = none), each a module constructor.
BLOCK_MODULES: dict[str, Callable[..., nn.Module]] = {
  'se': SqueezeExcite,
  'eca': EfficientChannelAttention,
  'cbam': Cbam,
  'ge_minus': GatherExcite,
  'ge': functools.partial(GatherExcite, extra_params=True),
  'ge_plus': functools.partial(GatherExcite, extra_params=True, use_mlp=True),
}
# config.model.stage_attention's names ('' = none).
STAGE_MODULES: dict[str, Callable[..., nn.Module]] = {'bam': Bam}


def takes_norm(constructor: Callable[..., nn.Module]) -> bool:
  """Whether the module has BatchNorm, so needs the network's `norm` partial."""
  module = constructor.func if isinstance(constructor, functools.partial) else constructor
  return 'norm' in module.__dataclass_fields__


__all__ = [
  'BLOCK_MODULES',
  'STAGE_MODULES',
  'takes_norm',
  'Bam',
  'Cbam',
  'EfficientChannelAttention',
  'GatherExcite',
  'SqueezeExcite',
]
