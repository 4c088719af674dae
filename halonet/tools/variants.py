"""Params and FLOPs of a HaloNet config next to the paper's figures (`python summary.py`).

Params come from jax.eval_shape and FLOPs from XLA's cost analysis of the lowered (uncompiled)
forward pass, so even H7 at 600 px costs neither memory nor a compile.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from halonet import text_table
from halonet.models import halonet as model
from halonet.models import networks
from halonet.models import paper


def neighbourhood(config: ml_collections.ConfigDict) -> str:
  """What each attending stage sees, e.g. '14x14 (b=8, h=3)', '7x7 window (SASA)', 'global'."""
  described = []
  for mixer, (b, h) in zip(model.stage_mixers(config.model), model.stage_windows(config.model)):
    if mixer == 'halo':
      described.append(f'{b + 2 * h}x{b + 2 * h} (b={b}, h={h})')
    elif mixer == 'sasa':
      k = config.model.sasa_window
      described.append(f'{k}x{k} window (SASA)')
    elif mixer == 'global':
      described.append('global')
  if not described:
    return 'none (all conv)'
  described = list(dict.fromkeys(described))
  if config.model.mask_window and 'halo' in model.stage_mixers(config.model):
    k = config.model.mask_window
    described.append(f'masked to {k}x{k}')
  return ', '.join(described)


def gflops_per_image(config: ml_collections.ConfigDict) -> float:
  """Forward GFLOPs for one image at config.image_size (a multiply-add counts as 2).

  Counted on the loop-free plain attention: XLA's cost analysis counts a loop body once. SASA
  stages are counted in their per-pixel form (b = 1), whose k^2 keys per query are the layer's
  definition; the block-wise form computes the same with (b + k - 1)^2 keys per block.
  """
  config = config.copy_and_resolve_references()
  config.model.attention_impl = 'plain'
  mixers = model.stage_mixers(config.model)
  if 'sasa' in mixers:
    windows = model.stage_windows(config.model)
    config.model.block_sizes = tuple(1 if m == 'sasa' else b for m, (b, _) in zip(mixers, windows))
    config.model.halo_sizes = tuple(h for _, h in windows)
  net = networks.create_model(config)
  variables = networks.abstract_variables(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  lowered = jax.jit(functools.partial(net.apply, train=False)).lower(variables, images)
  return lowered.cost_analysis()['flops'] / 1e9


def summarize(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """One row of the summary table."""
  params = networks.count_params(config)
  row = paper.VARIANTS.get(config.variant)
  published = None if row is None else row.params_m
  return {
    'variant': config.variant,
    'image_size': config.image_size,
    'params_m': round(params / 1e6, 3),
    'paper_params_m': published,
    'diff_percent': None if row is None else round(100 * (params / 1e6 - published) / published, 2),
    'gflops': round(gflops_per_image(config), 3),
    'neighbourhood': neighbourhood(config),
  }


def format_rows(rows: list[dict[str, Any]]) -> str:
  """The summary rows as a text table."""
  return text_table.format_table(
    [
      {
        'variant': r['variant'],
        'size': r['image_size'],
        'params M': round(r['params_m'], 2),
        'paper M': r['paper_params_m'],
        'diff %': None if r['diff_percent'] is None else f'{r["diff_percent"]:+.2f}',
        'GFLOPs': round(r['gflops'], 2),
        'neighbourhood': r['neighbourhood'],
      }
      for r in rows
    ]
  )
