"""Params and FLOPs of a HaloNet config next to the paper's figures (`python summary.py`).

Params come from jax.eval_shape and FLOPs from XLA's cost analysis of the lowered (uncompiled)
forward pass, so even H7 at 600 px costs neither memory nor a compile.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from halonet import model
from halonet import paper
from halonet import text_table


def neighbourhood(config: ml_collections.ConfigDict) -> str:
  """Attention neighbourhood of each attention stage, e.g. '14x14 (b=8, h=3)'."""
  conv_stages = set(config.model.conv_stages)
  windows = [
    w for stage, w in enumerate(model.stage_windows(config.model), 1) if stage not in conv_stages
  ]
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
