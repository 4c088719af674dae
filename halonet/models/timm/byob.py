"""timm's halo-attention networks (timm/models/byoanet.py, built by byobnet.py) in Flax.

timm holds the only trained halo models (ImageNet-1k); `halonet/tools/convert.py` loads their
weights into these modules, and `tests/tools/test_timm_parity.py` checks the logits and stage
features against timm itself. What they have that H0-H7 lack, each as timm builds it:
  - stems: 'tiered' (3x3 convs of 3c/8, c/2, c channels, stride 2 then 1, 1; the last strides 2
    when there is no max-pool), '7x7' and RegNet's '3x3' (one stride-2 conv); symmetric conv
    padding (not 'SAME', which pads stride-2 convs on the bottom/right only); BatchNorm eps 1e-5;
  - stages mixing conv bottlenecks ('bottle': 1x1, grouped 3x3, SE/ECA, 1x1) with halo blocks
    ('self_attn': 1x1, halo attention, BatchNorm + activation, 1x1), a 1x1 projection shortcut
    (strided conv) wherever the shape changes, SiLU or ReLU, an optional final 1x1 conv;
  - RegNetZ's blocks (haloregnetz_b): widths from the block's input ('bottle_in', an inverted
    bottleneck), no activation after the sum ('linear_out'), no shortcut where the shape changes;
  - timm's HaloAttn semantics: padded keys are zero and unmasked, relative positions are indexed
    in window coordinates (`attention.POSITION_INDEXINGS`), head widths from `dim_head` or
    `qk_ratio`. Its position logits are not scaled by 1/sqrt(d) while ours are: the converter
    scales the tables instead, so the layer is `attention.HaloAttention` unchanged;
    a strided halo whose block size the stride does not divide attends at full resolution, then
    average-pools;
  - BoTNet's global attention (timm's BottleneckAttn) as that layer with one block covering the
    whole map and no halo; the lambda layer (`halonet/models/timm/lambda_layer.py`).
"""

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet import attention
from halonet import errors
from halonet.attention.choose import AttentionPlan
from halonet.models import channel_attention
from halonet.models import conv_norm
from halonet.models.keys import CLASSIFIER
from halonet.models.keys import FEATURES
from halonet.models.keys import PRE_LOGITS
from halonet.models.timm import lambda_layer
from halonet.rounding import ceil_div
from halonet.rounding import make_divisible


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: its blocks' types in order, output width c, first-block stride, group size
  (0: dense 3x3), bottleneck ratio, and the halo attention's settings where the stage overrides
  the model's (timm's per-stage self_attn_kwargs replace the model's whole)."""

  blocks: tuple[str, ...]
  width: int
  stride: int
  group_size: int = 0
  bottle_ratio: float = 0.25
  attention: tuple[tuple[str, Any], ...] | None = None


@dataclasses.dataclass(frozen=True)
class Arch:
  """A whole network as timm's ByoModelCfg describes it (fields of the same meaning)."""

  stages: tuple[Stage, ...]
  stem_type: str  # 'tiered', '7x7' or '3x3'.
  stem_pool: str
  stem_width: int = 64
  activation: str = 'relu'
  channel_attention: str = ''  # '', 'se' or 'eca', in every conv bottleneck after its 3x3.
  se_ratio: float = 1 / 16  # SE's hidden width over its input's.
  num_features: int = 0  # Width of a final 1x1 conv; 0: none.
  # timm's self_attn_kwargs: 'layer' ('halo', 'bottleneck' or 'lambda') and the layer's own
  # (block_size, halo_size, num_heads, dim_head, qk_ratio; r for the lambda layer).
  attention: tuple[tuple[str, Any], ...] = ()
  bottle_in: bool = False  # Bottleneck width from the block's input width, not its output's.
  linear_out: bool = False  # No activation after the residual sum.
  shortcut_conv: bool = True  # A 1x1 conv shortcut where the shape changes; False: none there.


def interleave(types: tuple[str, str], depth: int, every: int | list[int] = 1) -> tuple[str, ...]:
  """timm's interleave_blocks: the second type at the positions `every` names (an int n: every
  (n+1)-th block from the n-th; the last block when that names none)."""
  if isinstance(every, int):
    every = list(range(every, depth, every + 1)) or [depth - 1]
  return tuple(types[1] if i in every else types[0] for i in range(depth))


_BOTTLE, _ATTN = 'bottle', 'self_attn'
# The map side BoTNet's global attention ('layer': 'bottleneck') is built for: timm's *_256
# models, whose fourth stage sees 8 x 8 maps.
BOTTLENECK_MAP = 8
ARCHS = {
  'halonet_h1': Arch(
    stages=(
      Stage((_ATTN,) * 3, 64, 1, bottle_ratio=1.0),
      Stage((_ATTN,) * 3, 128, 2, bottle_ratio=1.0),
      Stage((_ATTN,) * 10, 256, 2, bottle_ratio=1.0),
      Stage((_ATTN,) * 3, 512, 2, bottle_ratio=1.0),
    ),
    stem_type='7x7',
    stem_pool='maxpool',
    attention=(('block_size', 8), ('halo_size', 3)),
  ),
  'halonet26t': Arch(
    stages=(
      Stage((_BOTTLE,) * 2, 256, 1),
      Stage((_BOTTLE,) * 2, 512, 2),
      Stage(interleave((_BOTTLE, _ATTN), 2), 1024, 2),
      Stage((_ATTN,) * 2, 2048, 2),
    ),
    stem_type='tiered',
    stem_pool='maxpool',
    attention=(('block_size', 8), ('halo_size', 2)),
  ),
  'sehalonet33ts': Arch(
    stages=(
      Stage((_BOTTLE,) * 2, 256, 1),
      Stage(interleave((_BOTTLE, _ATTN), 3, [2]), 512, 2),
      Stage(interleave((_BOTTLE, _ATTN), 3, [2]), 1024, 2),
      Stage((_ATTN,) * 2, 1536, 2, bottle_ratio=0.333),
    ),
    stem_type='tiered',
    stem_pool='',
    activation='silu',
    channel_attention='se',
    num_features=1280,
    attention=(('block_size', 8), ('halo_size', 3)),
  ),
  'halonet50ts': Arch(
    stages=(
      Stage((_BOTTLE,) * 3, 256, 1),
      Stage(
        interleave((_BOTTLE, _ATTN), 4, 4),
        512,
        2,
        attention=(('block_size', 8), ('halo_size', 3), ('num_heads', 4)),
      ),
      Stage(interleave((_BOTTLE, _ATTN), 6), 1024, 2),
      Stage(interleave((_BOTTLE, _ATTN), 3), 2048, 2),
    ),
    stem_type='tiered',
    stem_pool='maxpool',
    activation='silu',
    attention=(('block_size', 8), ('halo_size', 3)),
  ),
  'eca_halonext26ts': Arch(
    stages=(
      Stage((_BOTTLE,) * 2, 256, 1, group_size=16),
      Stage((_BOTTLE,) * 2, 512, 2, group_size=16),
      Stage(interleave((_BOTTLE, _ATTN), 2), 1024, 2, group_size=16),
      Stage((_ATTN,) * 2, 2048, 2, group_size=16),
    ),
    stem_type='tiered',
    stem_pool='maxpool',
    activation='silu',
    channel_attention='eca',
    attention=(('block_size', 8), ('halo_size', 2), ('dim_head', 16)),
  ),
  'halo2botnet50ts_256': Arch(
    stages=(
      Stage((_BOTTLE,) * 3, 256, 1),
      Stage(interleave((_BOTTLE, _ATTN), 4), 512, 2, attention=(('halo_size', 3),)),
      Stage(interleave((_BOTTLE, _ATTN), 6), 1024, 2, attention=(('halo_size', 3),)),
      # BoTNet's global attention over the fixed 8 x 8 map at 256 px (timm's BottleneckAttn).
      Stage(interleave((_BOTTLE, _ATTN), 3), 2048, 2, attention=(('layer', 'bottleneck'),)),
    ),
    stem_type='tiered',
    stem_pool='',
    activation='silu',
  ),
  'haloregnetz_b': Arch(
    stages=(
      Stage((_BOTTLE,) * 2, 48, 2, group_size=16, bottle_ratio=3),
      Stage((_BOTTLE,) * 6, 96, 2, group_size=16, bottle_ratio=3),
      Stage(interleave((_BOTTLE, _ATTN), 12, 3), 192, 2, group_size=16, bottle_ratio=3),
      Stage((_ATTN,) * 2, 288, 2, group_size=16, bottle_ratio=3),
    ),
    stem_type='3x3',
    stem_pool='',
    stem_width=32,
    activation='silu',
    channel_attention='se',
    se_ratio=0.25,
    num_features=1536,
    attention=(('block_size', 7), ('halo_size', 2), ('qk_ratio', 0.33)),
    bottle_in=True,
    linear_out=True,
    shortcut_conv=False,
  ),
  'lamhalobotnet50ts_256': Arch(
    stages=(
      Stage((_BOTTLE,) * 3, 256, 1),
      Stage(interleave((_BOTTLE, _ATTN), 4), 512, 2, attention=(('layer', 'lambda'), ('r', 13))),
      Stage(interleave((_BOTTLE, _ATTN), 6), 1024, 2, attention=(('halo_size', 3),)),
      Stage(interleave((_BOTTLE, _ATTN), 3), 2048, 2, attention=(('layer', 'bottleneck'),)),
    ),
    stem_type='tiered',
    stem_pool='',
    activation='silu',
  ),
}


def stem_stride(spec: Arch) -> int:
  """A stride-2 conv, then a max-pool or (the tiered stem) a second stride 2, or nothing more."""
  return 4 if spec.stem_pool or spec.stem_type == 'tiered' else 2


def check_config(arch: str, image_size: int) -> None:
  """Fails in one line unless `arch` is known and every halo layer's input map at `image_size`
  is whole blocks: timm's layer takes no other size, so no converted weights were trained on one."""
  if arch not in ARCHS:
    raise errors.ConfigError(f'model.arch={arch!r} is not one of {sorted(ARCHS)}')
  spec = ARCHS[arch]
  size = ceil_div(image_size, stem_stride(spec))
  for number, stage in enumerate(spec.stages, 1):
    out = ceil_div(size, stage.stride)
    kwargs = dict(spec.attention if stage.attention is None else stage.attention)
    layer, block = kwargs.get('layer', 'halo'), kwargs.get('block_size', 8)
    for i, kind in enumerate(stage.blocks):
      side = size if i == 0 else out
      if kind == _ATTN and layer == 'bottleneck' and side != BOTTLENECK_MAP:
        raise errors.ConfigError(
          f'{arch} takes {BOTTLENECK_MAP * image_size // side} px images only (its global '
          f'attention has a position table for {BOTTLENECK_MAP} x {BOTTLENECK_MAP} maps), '
          f'not image_size={image_size}'
        )
      if kind == _ATTN and layer == 'halo' and side % block:
        multiple = stem_stride(spec) * math.prod(s.stride for s in spec.stages) * block
        raise errors.ConfigError(
          f'image_size={image_size} gives stage{number}_block{i} of {arch} a {side} x {side} map, '
          f'not whole {block} x {block} blocks; use a multiple of {multiple}'
        )
    size = out


class Block(nn.Module):
  """timm's BottleneckBlock ('bottle') or SelfAttnBlock ('self_attn'), with its shortcut; `spec`
  gives the model-wide choices (activation, channel attention, RegNetZ's block form)."""

  kind: str
  width: int
  stride: int
  group_size: int
  bottle_ratio: float
  spec: Arch
  attention_kwargs: tuple[tuple[str, Any], ...]
  attention: AttentionPlan
  drop_path_rate: float
  norm: Callable[..., nn.Module]  # BatchNorm, built once by the network for train or eval.
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    spec = self.spec
    act = conv_norm.ACTIVATIONS[spec.activation]
    conv = functools.partial(conv_norm.ConvNormAct, kernel=1, norm=self.norm, dtype=self.dtype)
    mid = make_divisible((x.shape[-1] if spec.bottle_in else self.width) * self.bottle_ratio)
    y = conv(mid, act=act, name='conv1_1x1')(x)
    if self.kind == _BOTTLE:
      groups = mid // self.group_size if self.group_size else 1
      y = conv(mid, kernel=3, stride=self.stride, groups=groups, act=act, name='conv2_kxk')(y)
      if spec.channel_attention == 'se':
        y = channel_attention.SqueezeExcite(spec.se_ratio, dtype=self.dtype, name='attn')(y)
      elif spec.channel_attention == 'eca':
        y = channel_attention.EfficientChannelAttention(dtype=self.dtype, name='attn')(y)
    else:
      y = act(self.norm(name='post_attn')(self._attention(y, mid, train)))
    y = conv(self.width, name='conv3_1x1')(y)
    y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3))(y, deterministic=not train)
    if self.stride == 1 and x.shape[-1] == self.width:
      y = y + x
    elif spec.shortcut_conv:
      y = y + conv(self.width, stride=self.stride, name='shortcut')(x)
    return y if spec.linear_out else act(y)

  def _attention(self, y: jax.Array, mid: int, train: bool) -> jax.Array:
    """The block's spatial mixer: halo attention, BoTNet's global attention or a lambda layer."""
    kwargs = dict(self.attention_kwargs)
    layer = kwargs.pop('layer', 'halo')
    if layer == 'lambda':
      return lambda_layer.LambdaLayer(
        num_heads=kwargs.get('num_heads', 4),
        key_width=kwargs.get('dim_head', 16),
        radius=kwargs.get('r', 9),
        stride=self.stride,
        dtype=self.dtype,
        name='self_attn',
      )(y, train)
    if layer == 'bottleneck':
      # Global attention over the map = one block covering it, no halo (the same tables and
      # window indexing). No arch strides it: timm would average-pool its output then.
      kwargs = {'num_heads': 4, **kwargs, 'block_size': y.shape[1], 'halo_size': 0}
    heads, block = kwargs.get('num_heads', 8), kwargs.get('block_size', 8)
    head_qk = kwargs.get('dim_head') or make_divisible(mid * kwargs.get('qk_ratio', 1.0)) // heads
    # A stride that does not divide the block: attention at full resolution, then a 2 x 2 mean.
    pooled = self.stride > 1 and block % self.stride != 0
    y = attention.HaloAttention(
      qk_width=head_qk * heads,
      value_width=mid,
      num_heads=heads,
      block_size=block,
      halo_size=kwargs.get('halo_size', 3),
      stride=1 if pooled else self.stride,
      attention=self.attention,
      mask_padding=False,
      position_indexing='window',
      dtype=self.dtype,
      name='self_attn',
    )(y)
    return nn.avg_pool(y, (2, 2), strides=(2, 2)) if pooled else y


class ByobNet(nn.Module):
  """One of `ARCHS` by name, with model.HaloNet's interface: (images, train) -> logits, stage
  outputs sown as FEATURES 'stage1'..'stage4', the classifier named CLASSIFIER."""

  arch: str
  num_classes: int
  attention: AttentionPlan = AttentionPlan()
  stochastic_depth_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    spec = ARCHS[self.arch]
    act = conv_norm.ACTIVATIONS[spec.activation]
    dtype = jnp.dtype(self.dtype)
    norm = conv_norm.batch_norm(train, dtype)
    conv = functools.partial(conv_norm.ConvNormAct, norm=norm, act=act, dtype=dtype)
    x = images.astype(dtype)
    c = spec.stem_width
    if spec.stem_type == 'tiered':
      last_stride = 1 if spec.stem_pool else 2
      for i, (width, stride) in enumerate(((3 * c // 8, 2), (c // 2, 1), (c, last_stride)), 1):
        x = conv(width, 3, stride=stride, name=f'stem_conv{i}')(x)
    elif spec.stem_type == '7x7':
      x = conv(c, 7, stride=2, name='stem_conv1')(x)
    else:  # '3x3'
      x = conv(c, 3, stride=2, name='stem')(x)
    if spec.stem_pool:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    total = sum(len(s.blocks) for s in spec.stages)
    index = 0
    for number, stage in enumerate(spec.stages, 1):
      for i, kind in enumerate(stage.blocks):
        x = Block(
          kind=kind,
          width=stage.width,
          stride=stage.stride if i == 0 else 1,
          group_size=stage.group_size,
          bottle_ratio=stage.bottle_ratio,
          spec=spec,
          attention_kwargs=spec.attention if stage.attention is None else stage.attention,
          attention=self.attention,
          drop_path_rate=self.stochastic_depth_rate * index / max(total - 1, 1),
          norm=norm,
          dtype=dtype,
          name=f'stage{number}_block{i}',
        )(x, train)
        index += 1
      if not self.is_initializing():
        self.sow(FEATURES, f'stage{number}', x)
    if spec.num_features:
      x = conv(spec.num_features, 1, name='final_conv')(x)
    x = x.mean(axis=(1, 2))
    if not self.is_initializing():  # Frozen features for linear probes (halonet/evaluators).
      self.sow(PRE_LOGITS, PRE_LOGITS, x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name=CLASSIFIER)(x.astype(jnp.float32))
