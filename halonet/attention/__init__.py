"""Blocked local self-attention with haloing (HaloNet, Vaswani et al. 2021, section 2.1).

layer.py           HaloAttention: projections, padding, position tables, the call below
common.py          the contract every form follows (Attend), masks, position indices, legend
plain.py           the loop-free form with autodiff: the reference
rows.py            a row loop with a hand-written backward pass (the CPU fast path)
spatial.py         any form with image rows split over devices (halo rows exchanged)
pallas.py          fused TPU kernels (pallas_kernels.py holds their bodies)
pallas_gpu.py      fused GPU (Triton) kernels
dense.py           each block as one jax.nn.dot_product_attention call (cuDNN on GPU)
choose.py          which form runs: config.model.attention_impl made one plan for the network
measure.py         'auto' on an accelerator: each layer's candidate forms timed, the fastest kept
"""

from halonet.attention.choose import AUTO_IMPLEMENTATION
from halonet.attention.choose import IMPLEMENTATIONS
from halonet.attention.choose import AttentionPlan
from halonet.attention.choose import LayerShape
from halonet.attention.choose import plan
from halonet.attention.choose import resolve_impl
from halonet.attention.common import MASKED_LOGIT
from halonet.attention.common import check_attention_args
from halonet.attention.common import key_bias
from halonet.attention.common import num_relative_offsets
from halonet.attention.common import relative_index
from halonet.attention.layer import ATTENTION_WEIGHTS
from halonet.attention.layer import HaloAttention
from halonet.attention.layer import HeadProjection
from halonet.attention.plain import neighbourhoods
from halonet.attention.plain import plain_attention

__all__ = [
  'AUTO_IMPLEMENTATION',
  'IMPLEMENTATIONS',
  'AttentionPlan',
  'LayerShape',
  'plan',
  'resolve_impl',
  'MASKED_LOGIT',
  'check_attention_args',
  'key_bias',
  'num_relative_offsets',
  'relative_index',
  'ATTENTION_WEIGHTS',
  'HaloAttention',
  'HeadProjection',
  'neighbourhoods',
  'plain_attention',
]
