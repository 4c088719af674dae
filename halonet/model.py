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
import ml_collections

from halonet import attention
from halonet import byob
from halonet import channel_attention
from halonet import deep_stem
from halonet import errors
from halonet import mixers
from halonet import sasa_stem
from halonet.mixers import pooling
from halonet.model_keys import CLASSIFIER
from halonet.model_keys import FEATURES

# Total downsampling of the stem and stages 2-4: the smallest image that yields a 1x1 stage-4 map.
MIN_IMAGE_SIZE = 32
_ACTIVATIONS = {'relu': nn.relu, 'silu': nn.silu}
_DTYPES = ('float32', 'bfloat16')
# What dtype='auto' computes in on each backend: bfloat16 on TPU and GPU (matmul units built for
# it); float32 on CPU, which has no bfloat16 matmul units (bench/run.py: bf16 is slower there).
AUTO_DTYPE = {'cpu': 'float32'}
STEMS = ('conv', 'sasa', *deep_stem.WIDTHS)
# The projection shortcut where a block downsamples: a strided 1x1 conv, or (timm's avg_down, the
# 'd' ResNets) a 2x2 average pool then the 1x1 conv, which sees every input pixel.
SHORTCUTS = ('conv', 'avg_down')


def stage_windows(model_config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
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


def resolve_backend_defaults(
  model_config: ml_collections.ConfigDict, backend: str | None = None
) -> dict[str, Any]:
  """config.model as plain values, with each 'auto' (dtype, attention_impl) chosen for `backend`.

  `backend` defaults to JAX's default backend ('cpu', 'gpu' or 'tpu'); pass one explicitly to
  build the model a TPU or GPU would run, e.g. for cross-platform lowering.
  """
  backend = backend or jax.default_backend()
  fields = model_config.to_dict()
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  if fields['dtype'] == 'auto':
    fields['dtype'] = AUTO_DTYPE.get(backend, 'bfloat16')
  fields['attention_impl'] = attention.resolve_impl(fields['attention_impl'], backend)
  return fields


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails with one line naming the first bad model value, before anything is built or compiled."""
  m = config.model
  if m.arch:
    byob.check_config(m.arch, config.image_size)
  if m.activation not in _ACTIVATIONS:
    raise errors.ConfigError(f'activation={m.activation!r} is not one of {sorted(_ACTIVATIONS)}')
  if m.dtype not in ('auto', *_DTYPES):
    raise errors.ConfigError(f'dtype={m.dtype!r} is not one of {["auto", *_DTYPES]}')
  for name in ('widths', 'stage_depths', 'num_heads'):
    if len(m[name]) != 4:
      raise errors.ConfigError(f'{name}={tuple(m[name])} needs one entry per stage (4)')
  attention.choose.check_impl(m.attention_impl)
  bad_stages = [s for s in m.conv_stages if s not in (1, 2, 3, 4)]
  if bad_stages:
    raise errors.ConfigError(
      f'conv_stages={tuple(m.conv_stages)} may only name stages 1-4, got {bad_stages}'
    )
  _check_modules(m)
  side = -(-config.image_size // 4)  # Stage 1's map: the stem strides 4.
  for stage, ((b, h), w, heads, mixer) in enumerate(
    zip(stage_windows(m), m.widths, m.num_heads, stage_mixers(m)), 1
  ):
    stride = 1 if stage == 1 else 2
    side = -(-side // stride)  # The map of the stage's blocks after its first.
    _check_stage_mixer(m, stage, mixer, b, h, stride, w, heads, side)
  if m.stem == 'sasa' and 64 % m.num_heads[0]:
    raise errors.ConfigError(
      f"stem='sasa': num_heads[0]={m.num_heads[0]} does not divide the stem's width 64"
    )


def _check_modules(m: ml_collections.ConfigDict) -> None:
  """The names of mixers, channel attention, stage attention and stem, and their settings."""
  if tuple(m.mixers) and tuple(m.conv_stages):
    raise errors.ConfigError(
      f'mixers={tuple(m.mixers)} and conv_stages={tuple(m.conv_stages)} both set the stages; '
      "use mixers alone ('conv' for a conv stage)"
    )
  for name, names, known in (
    ('mixers', m.mixers, mixers.NAMES),
    ('channel_attention', m.channel_attention, ('', *channel_attention.BLOCK_MODULES)),
  ):
    if tuple(names) and len(names) != 4:
      raise errors.ConfigError(f'{name}={tuple(names)} needs one entry per stage (4)')
    bad = [n for n in names if n not in known]
    if bad:
      raise errors.ConfigError(f'{name}={tuple(names)}: {bad[0]!r} is not one of {list(known)}')
  if m.stage_attention not in ('', *channel_attention.STAGE_MODULES):
    known = ['', *channel_attention.STAGE_MODULES]
    raise errors.ConfigError(f'stage_attention={m.stage_attention!r} is not one of {known}')
  if m.stem not in STEMS:
    raise errors.ConfigError(f'stem={m.stem!r} is not one of {list(STEMS)}')
  if m.shortcut not in SHORTCUTS:
    raise errors.ConfigError(f'shortcut={m.shortcut!r} is not one of {list(SHORTCUTS)}')
  used = set(stage_mixers(m))
  if 'sk' in used:
    kernels = tuple(m.sk_kernels)
    if not kernels or any(k < 3 or k % 2 == 0 for k in kernels):
      raise errors.ConfigError(
        f'sk_kernels={kernels} needs at least one kernel, each odd and at least 3'
      )
  if 'split' in used and m.radix < 1:
    raise errors.ConfigError(f'radix={m.radix} needs to be at least 1')
  if used & {'condconv', 'dynamic'} and m.num_experts < 1:
    raise errors.ConfigError(f'num_experts={m.num_experts} needs to be at least 1')


def _check_stage_mixer(
  m: ml_collections.ConfigDict,
  stage: int,
  mixer: str,
  b: int,
  h: int,
  stride: int,
  w: int,
  heads: int,
  side: int,
) -> None:
  """One stage's mixer against its widths, heads and (at config.image_size) its input map."""
  value_width = int(w * m.value_ratio)
  if mixer == 'sk' and w % len(m.sk_kernels):
    raise errors.ConfigError(
      f'stage {stage}: sk_kernels={tuple(m.sk_kernels)} gives {len(m.sk_kernels)} paths, '
      f'which do not split its width {w}'
    )
  if mixer not in mixers.ATTENTION:
    return
  try:
    if mixer == 'halo':
      attention.check_attention_args(b, h, stride, m.mask_window)
    elif mixer == 'sasa':
      k = m.sasa_window
      if k < 1 or k % 2 == 0:
        raise ValueError(f'sasa_window={k} must be odd and positive')
      if k > side:
        raise ValueError(f'sasa_window={k} is larger than its {side} x {side} input map')
      attention.check_attention_args(b, k // 2, 1, k)
  except ValueError as e:
    raise errors.ConfigError(f'stage {stage}: {e}') from None
  for name, width in (('width', w), ('value width', value_width)):
    if heads <= 0 or width % heads:
      raise errors.ConfigError(
        f'stage {stage}: num_heads={heads} does not divide its {name} {width}'
      )


class BottleneckBlock(nn.Module):
  """1x1 conv -> spatial mixer -> 1x1 conv -> channel attention, plus a residual.

  `mixer` builds the spatial mixer as mixer(value_width=..., stride=...) (halonet/mixers): any
  module with those two fields fits, so a new variant plugs in without touching the block.
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
  survey's modules). Fields are exactly those of `config.model` (halonet/defaults.py), where
  each is documented; H0-H7 differ only in their values. `attention_cls` is the attention module
  of 'halo' stages (HaloAttention's fields), for trying a new variant.
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
  attention_impl: str
  remat: bool
  use_se: bool
  activation: str
  stochastic_depth_rate: float
  dropout_rate: float
  dtype: str
  attention_cls: Callable[..., nn.Module] = attention.HaloAttention
  # The run's measured form per attention layer shape (attention/measure.py); () = the rule.
  attention_choice: tuple[tuple[str, str], ...] = ()

  def _mixer(
    self, name: str, width: int, heads: int, window: tuple[int, int], norm, act, dtype
  ) -> Callable[..., nn.Module]:
    """Stage's mixer constructor, (value_width, stride) left to the block."""
    (b, h), attend = window, dict(attention_impl=self.attention_impl, dtype=dtype)
    attend['attention_choice'] = self.attention_choice
    if name == 'halo':
      return functools.partial(
        self.attention_cls,
        qk_width=width,
        num_heads=heads,
        block_size=b,
        halo_size=h,
        mask_window=self.mask_window,
        **attend,
      )
    if name == 'sasa':
      return functools.partial(
        mixers.LocalAttention,
        qk_width=width,
        num_heads=heads,
        window=self.sasa_window,
        block_size=b,
        **attend,
      )
    if name == 'global':
      return functools.partial(mixers.GlobalAttention, qk_width=width, num_heads=heads, **attend)
    if name == 'sk':
      return functools.partial(
        mixers.SelectiveKernel, norm=norm, act=act, kernels=tuple(self.sk_kernels), dtype=dtype
      )
    if name == 'split':
      return functools.partial(
        mixers.SplitAttention, norm=norm, act=act, radix=self.radix, dtype=dtype
      )
    if name == 'condconv':
      return functools.partial(mixers.CondConv, num_experts=self.num_experts, dtype=dtype)
    if name == 'dynamic':
      return functools.partial(mixers.DynamicConv, num_kernels=self.num_experts, dtype=dtype)
    return functools.partial(mixers.Conv3x3, dtype=dtype)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    act = _ACTIVATIONS[self.activation]
    dtype = jnp.dtype(self.dtype)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
    )
    x = images.astype(dtype)
    if self.stem == 'sasa':
      x = sasa_stem.AttentionStem(
        width=64,
        num_heads=self.num_heads[0],
        norm=norm,
        attention_impl=self.attention_impl,
        attention_choice=self.attention_choice,
        dtype=dtype,
        name='stem_attention',
      )(x)
    elif self.stem in deep_stem.WIDTHS:
      x = deep_stem.DeepStem(kind=self.stem, norm=norm, dtype=dtype, name='stem_deep')(x)
    else:
      x = nn.Conv(
        64,
        (7, 7),
        strides=2,
        padding=((3, 3), (3, 3)),
        use_bias=False,
        dtype=dtype,
        name='stem_conv',
      )(x)
      x = norm(name='stem_bn')(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

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
      mixer = self._mixer(mixer_name, width, heads, window, norm, act, dtype)
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
      # Multi-scale features (strides 4, 8, 16, 32) for dense tasks: see halonet/trained.py.
      if not self.is_initializing():
        self.sow(FEATURES, f'stage{stage}', x)

    if self.final_width:
      x = nn.Dense(self.final_width, use_bias=False, dtype=dtype, name='final_conv')(x)
      x = act(norm(name='final_bn')(x))
    x = x.mean(axis=(1, 2))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name=CLASSIFIER)(x.astype(jnp.float32))


def create_model(
  config: ml_collections.ConfigDict,
  backend: str | None = None,
  attention_choice: tuple[tuple[str, str], ...] = (),
) -> HaloNet:
  """The HaloNet of `config.model` (validated first), with 'auto' fields chosen for `backend`;
  with a measured `attention_choice`, 'auto' attention takes each layer's form from it."""
  validate_config(config)
  fields = resolve_backend_defaults(config.model, backend)
  if attention_choice:
    fields['attention_impl'] = config.model.attention_impl
  arch = fields.pop('arch')
  if arch:  # One of timm's halo networks; the HaloNet fields do not apply.
    return byob.ByobNet(
      arch=arch,
      num_classes=config.num_classes,
      attention_impl=fields['attention_impl'],
      stochastic_depth_rate=fields['stochastic_depth_rate'],
      dropout_rate=fields['dropout_rate'],
      dtype=fields['dtype'],
      attention_choice=tuple(attention_choice),
    )
  return HaloNet(num_classes=config.num_classes, attention_choice=tuple(attention_choice), **fields)


def abstract_variables(config: ml_collections.ConfigDict, batch_size: int = 1) -> Any:
  """Shapes of all variables via jax.eval_shape: free even for H7 at 600 px."""
  model = create_model(config)
  images = jax.ShapeDtypeStruct((batch_size, config.image_size, config.image_size, 3), jnp.float32)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  return jax.eval_shape(functools.partial(model.init, train=False), rngs, images)


def count_params(config: ml_collections.ConfigDict) -> int:
  """Trainable parameters (BN running statistics excluded)."""
  params = abstract_variables(config)['params']
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
