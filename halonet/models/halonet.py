"""HaloNet: a ResNet-style backbone with blocked local self-attention in place of the 3x3 conv.

Stem: 7x7 conv 64 stride 2, BN, ReLU, 3x3 max-pool stride 2. Four stages of bottleneck blocks
(depths (3, 3, l_3, 3), base widths w = (64, 128, 256, 512)): 1x1 conv to w, attention(b, h) with
query/key width w and value width w * r_v (no output projection), 1x1 conv to w * r_b. A projection
shortcut wherever the shape changes; the first block of stages 2-4 downsamples with strided
attention. Optional final 1x1 conv to d_f, global average pool, dropout, linear classifier.
The same network builds SASA's and BoTNet's backbones and ResNets with the survey's modules:
each stage's mixer and channel attention, BAM and the stem are config fields
(docs/attention_modules.md).

Parameter counts. With relative tables shared by the heads (one d-dim embedding per offset, as in
BoTNet and timm) this reproduces the paper's table to within 1% for H0-H2 and H4-H7. H3's row
(b=10, h=3, r_v=1, r_b=1.5, l_3=12, d_f=1024) gives 11.83 M against the published 12.3 M (-3.8%):
no reading of that row (expansion, per-head tables, BN or bias choices) reaches 12.3 M without
breaking the other seven, so the published figure likely comes from a configuration that differs
from the published row (e.g. one more stage-3 block gives 12.2 M). Tables per head would add
2.5% to H0 and push it outside 1%.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet import errors
from halonet.attention.choose import AttentionPlan
from halonet.attention.layer import HaloAttention
from halonet.models import channel_attention
from halonet.models import conv_norm
from halonet.models import mixers
from halonet.models import stems
from halonet.models.keys import CLASSIFIER
from halonet.models.keys import FEATURES
from halonet.models.keys import PRE_LOGITS
from halonet.models.mixers import pooling

# Total downsampling of the stem and stages 2-4: the smallest image that yields a 1x1 stage-4 map.
MIN_IMAGE_SIZE = 32
# The projection shortcut where a block downsamples: a strided 1x1 conv, or (timm's avg_down, the
# 'd' ResNets) a 2x2 average pool then the 1x1 conv, which sees every input pixel.
SHORTCUTS = ('conv', 'avg_down')


def stage_windows(model_config: Any) -> list[tuple[int, int]]:
  """(b, h) of each of the four stages, from the per-stage overrides or the single b, h."""
  blocks = tuple(model_config.block_sizes) or (model_config.block_size,) * 4
  halos = tuple(model_config.halo_sizes) or (model_config.halo_size,) * 4
  if len(blocks) != 4 or len(halos) != 4:
    raise errors.ConfigError(
      f'block_sizes={blocks} and halo_sizes={halos} need one entry per stage (4)'
    )
  return list(zip(blocks, halos))


def stage_mixers(model_config: Any) -> list[str]:
  """The mixer of each stage: `mixers`, or halo attention but in `conv_stages`."""
  if tuple(model_config.mixers):
    return list(model_config.mixers)
  return ['conv' if stage in model_config.conv_stages else 'halo' for stage in (1, 2, 3, 4)]


def stage_channel_attention(model_config: Any) -> list[str]:
  """The channel attention of each stage's blocks ('' = none): `channel_attention`, or SE
  everywhere with `use_se`."""
  if tuple(model_config.channel_attention):
    return list(model_config.channel_attention)
  return ['se' if model_config.use_se else ''] * 4


class BottleneckBlock(nn.Module):
  """1x1 conv -> spatial mixer -> 1x1 conv -> channel attention, plus a residual.

  `mixer` builds the spatial mixer as mixer(value_width=..., stride=...) (halonet/models/mixers):
  any module with those two fields fits, so a new variant plugs in without touching the block.
  BatchNorm and the activation follow it unless `mixer_normalizes` (SK, Split Attention end with
  their own). `channel_attention` builds the gate after the last BatchNorm, or is None.
  `avg_down` average-pools the shortcut where it strides (model.shortcut='avg_down').
  """

  width: int
  out_width: int
  value_width: int
  stride: int
  mixer: Callable[..., nn.Module]
  mixer_normalizes: bool
  channel_attention: Callable[..., nn.Module] | None
  avg_down: bool
  drop_path_rate: float
  act: Callable[[jax.Array], jax.Array]
  norm: Callable[..., nn.Module]  # BatchNorm, built once by the network for train or eval.
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # 1x1 convolutions as Dense over channels: the same function and parameter count, and XLA:CPU
    # runs a plain matmul ~1.7x faster than its 1x1 convolution (fwd + bwd).
    pointwise = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    norm = self.norm
    y = self.act(norm()(pointwise(self.width)(x)))
    y = self.mixer(value_width=self.value_width, stride=self.stride)(y)
    if not self.mixer_normalizes:
      y = self.act(norm()(y))
    y = pointwise(self.out_width)(y)
    # Zero-init the last BN scale so every block starts as the identity (Goyal et al.).
    y = norm(scale_init=nn.initializers.zeros)(y)
    if self.channel_attention:
      y = self.channel_attention(name='channel_attention')(y)
    # Stochastic depth: drop the residual branch per example.
    y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3))(y, deterministic=not train)
    residual = x
    if self.stride != 1 or x.shape[-1] != self.out_width:
      if self.avg_down:
        residual = pooling.downsample(x, self.stride)
      else:
        residual = x[:, :: self.stride, :: self.stride]
      residual = pointwise(self.out_width, name='proj')(residual)
      residual = norm(name='proj_bn')(residual)
    return self.act(y + residual)


class HaloNet(nn.Module):
  """The HaloNet family and the backbones it is compared with (SASA, BoTNet, ResNets with the
  survey's modules). Fields are those of `config.model` (halonet/defaults.py), where each is
  documented, but attention_impl: the network builder makes it one `attention` plan, the form
  each attention layer runs (attention/choose.py). H0-H7 differ only in their values.
  `attention_cls` is the attention module of 'halo' stages (HaloAttention's fields), for trying a
  new variant.
  """

  num_classes: int
  block_size: int
  halo_size: int
  block_sizes: Sequence[int]
  halo_sizes: Sequence[int]
  value_ratio: float
  bottleneck_ratio: float
  widths: Sequence[int]
  stage_depths: Sequence[int]
  num_heads: Sequence[int]
  final_width: int
  conv_stages: Sequence[int]
  mixers: Sequence[str]
  channel_attention: Sequence[str]
  stage_attention: str
  stem: str
  shortcut: str
  sasa_window: int
  sk_kernels: Sequence[int]
  radix: int
  num_experts: int
  mask_window: int
  remat: bool
  use_se: bool
  activation: str
  stochastic_depth_rate: float
  dropout_rate: float
  dtype: str
  attention: AttentionPlan = AttentionPlan()
  attention_cls: Callable[..., nn.Module] = HaloAttention

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    act = conv_norm.ACTIVATIONS[self.activation]
    dtype = jnp.dtype(self.dtype)
    norm = conv_norm.batch_norm(train, dtype)
    x = images.astype(dtype)
    x = stems.build(self.stem)(self, x, norm, dtype)

    # Rematerialisation recomputes each block's activations in the backward pass: only block
    # inputs are kept, for large images (H7 at 600 px) at a larger per-device batch.
    block_cls = nn.remat(BottleneckBlock, static_argnums=(2,)) if self.remat else BottleneckBlock
    total_blocks = sum(self.stage_depths)
    block_index = 0
    for stage, (width, depth, heads, window, mixer_name, gate_name) in enumerate(
      zip(
        self.widths,
        self.stage_depths,
        self.num_heads,
        stage_windows(self),
        stage_mixers(self),
        stage_channel_attention(self),
      ),
      1,
    ):
      mixer = mixers.build(mixer_name, self, mixers.Stage(width, heads, *window, norm, act, dtype))
      gate = None
      if gate_name:
        gate = functools.partial(channel_attention.BLOCK_MODULES[gate_name], dtype=dtype)
        if channel_attention.takes_norm(gate):
          gate = functools.partial(gate, norm=norm)
      for i in range(depth):
        x = block_cls(
          width=width,
          out_width=int(width * self.bottleneck_ratio),
          value_width=int(width * self.value_ratio),
          stride=2 if stage > 1 and i == 0 else 1,
          mixer=mixer,
          mixer_normalizes=mixer_name in mixers.NORMALIZED,
          channel_attention=gate,
          avg_down=self.shortcut == 'avg_down',
          drop_path_rate=self.stochastic_depth_rate * block_index / max(total_blocks - 1, 1),
          act=act,
          norm=norm,
          dtype=dtype,
          name=f'stage{stage}_block{i}',
        )(x, train)
        block_index += 1
      if self.stage_attention and stage < 4:  # Where the map shrinks, as BAM is placed.
        module = channel_attention.STAGE_MODULES[self.stage_attention]
        x = module(norm=norm, dtype=dtype, name=f'stage{stage}_{self.stage_attention}')(x)
      # Multi-scale features (strides 4, 8, 16, 32) for dense tasks: see halonet/tools/trained.py.
      if not self.is_initializing():
        self.sow(FEATURES, f'stage{stage}', x)

    if self.final_width:
      x = nn.Dense(self.final_width, use_bias=False, dtype=dtype, name='final_conv')(x)
      x = act(norm(name='final_bn')(x))
    x = x.mean(axis=(1, 2))
    if not self.is_initializing():  # Frozen features for linear probes (halonet/evaluators).
      self.sow(PRE_LOGITS, PRE_LOGITS, x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name=CLASSIFIER)(x.astype(jnp.float32))
