"""The architecture's own rules for config.model: names, per-stage lengths, and each stage's mixer
against its widths, heads and input map at config.image_size. Checked before anything is built,
so a bad value fails in one line naming it (config_checks.validate_config runs these too)."""

import ml_collections

from halonet import attention
from halonet import errors
from halonet.models import channel_attention
from halonet.models import conv_norm
from halonet.models import halonet as model
from halonet.models import mixers
from halonet.models import stems
from halonet.models.timm import byob
from halonet.rounding import ceil_div

DTYPES = ('float32', 'bfloat16')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails with one line naming the first bad model value, before anything is built or compiled."""
  m = config.model
  if m.arch:
    byob.check_config(m.arch, config.image_size)
  if m.activation not in conv_norm.ACTIVATIONS:
    raise errors.ConfigError(
      f'activation={m.activation!r} is not one of {sorted(conv_norm.ACTIVATIONS)}'
    )
  if m.dtype not in ('auto', *DTYPES):
    raise errors.ConfigError(f'dtype={m.dtype!r} is not one of {["auto", *DTYPES]}')
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
  side = ceil_div(config.image_size, 4)  # Stage 1's map: the stem strides 4.
  for stage, ((b, h), w, heads, mixer) in enumerate(
    zip(model.stage_windows(m), m.widths, m.num_heads, model.stage_mixers(m)), 1
  ):
    stride = 1 if stage == 1 else 2
    side = ceil_div(side, stride)  # The map of the stage's blocks after its first.
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
  stems.build(m.stem)
  if m.shortcut not in model.SHORTCUTS:
    raise errors.ConfigError(f'shortcut={m.shortcut!r} is not one of {list(model.SHORTCUTS)}')
  used = set(model.stage_mixers(m))
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
