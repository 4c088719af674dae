"""The network a config names, built for a backend: HaloNet from config.model's fields, or one of
timm's halo networks (config.model.arch); its variables' shapes and parameter count."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from halonet import attention
from halonet.models import checks as model_checks
from halonet.models.halonet import HaloNet
from halonet.models.timm import byob

# What dtype='auto' computes in on each backend: bfloat16 on TPU and GPU (matmul units built for
# it); float32 on CPU, which has no bfloat16 matmul units (bench/run.py: bf16 is slower there).
AUTO_DTYPE = {'cpu': 'float32'}


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


def create_model(
  config: ml_collections.ConfigDict,
  backend: str | None = None,
  attention_choice: tuple[tuple[str, str], ...] = (),
) -> HaloNet:
  """The HaloNet of `config.model` (validated first), with 'auto' fields chosen for `backend`;
  with a measured `attention_choice`, 'auto' attention takes each layer's form from it."""
  model_checks.validate_config(config)
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
