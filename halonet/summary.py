"""Params and FLOPs of H0-H7 (or any config) next to the paper's figures.

    python -m halonet.summary                          # H0-H7
    python -m halonet.summary --config=configs/quickstart.py --json

Params come from jax.eval_shape and FLOPs from XLA's cost analysis of the lowered (uncompiled)
forward pass, so even H7 at 600 px costs neither memory nor a compile.
"""

import functools
import json
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from configs import base
from halonet import model

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Also summarise this config.',
                                          lock_config=True)
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')


def neighbourhood(config: ml_collections.ConfigDict) -> str:
  """Attention neighbourhood of each attention stage, e.g. '14x14 (b=8, h=3)'."""
  conv_stages = set(config.model.conv_stages)
  windows = [w for stage, w in enumerate(model.stage_windows(config.model), 1)
             if stage not in conv_stages]
  if not windows:
    return 'none (all conv)'
  described = [f'{b + 2 * h}x{b + 2 * h} (b={b}, h={h})' for b, h in dict.fromkeys(windows)]
  if config.model.mask_window:
    k = config.model.mask_window
    described.append(f'masked to {k}x{k}')
  return ', '.join(described)


def gflops_per_image(config: ml_collections.ConfigDict) -> float:
  """Forward GFLOPs for one image at config.image_size (a multiply-add counts as 2).

  Counted on the loop-free plain attention: XLA's cost analysis counts a loop body once.
  """
  config = config.copy_and_resolve_references()
  config.model.attention_impl = 'plain'
  net = model.create_model(config)
  variables = model.abstract_variables(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  lowered = jax.jit(functools.partial(net.apply, train=False)).lower(variables, images)
  return lowered.cost_analysis()['flops'] / 1e9


def summarize(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """One row of the summary table."""
  params = model.count_params(config)
  paper = base.PAPER_VARIANTS.get(config.variant, {}).get('params_m')
  return {
      'variant': config.variant,
      'image_size': config.image_size,
      'params_m': round(params / 1e6, 3),
      'paper_params_m': paper,
      'diff_percent': None if paper is None else round(100 * (params / 1e6 - paper) / paper, 2),
      'gflops': round(gflops_per_image(config), 3),
      'neighbourhood': neighbourhood(config),
  }


def format_table(rows: list[dict[str, Any]]) -> str:
  """A fixed-width text table of summary rows."""
  header = f"{'variant':<11}{'size':>5}{'params M':>10}{'paper M':>9}{'diff %':>8}{'GFLOPs':>9}  neighbourhood"
  lines = [header, '-' * len(header)]
  for r in rows:
    paper = '-' if r['paper_params_m'] is None else f"{r['paper_params_m']:.1f}"
    diff = '-' if r['diff_percent'] is None else f"{r['diff_percent']:+.2f}"
    lines.append(f"{r['variant']:<11}{r['image_size']:>5}{r['params_m']:>10.2f}{paper:>9}"
                 f"{diff:>8}{r['gflops']:>9.2f}  {r['neighbourhood']}")
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  configs = [base.variant_config(name) for name in base.PAPER_VARIANTS]
  if _CONFIG.value is not None:
    configs.append(_CONFIG.value)
  rows = [summarize(c) for c in configs]
  print(json.dumps(rows, indent=2) if _JSON.value else format_table(rows))


if __name__ == '__main__':
  app.run(main)
