"""The network a config names, built for a backend: HaloNet from config.model's fields, or one of
timm's halo networks (config.model.arch); its variables' shapes and parameter count."""

from collections.abc import Sequence
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


def create_model(
  config: ml_collections.ConfigDict,
  backend: str | None = None,
  measured: Sequence[tuple[str, str]] = (),
) -> HaloNet | byob.ByobNet:
  """The network `config` names, validated first, for `backend` (default: JAX's; pass one to build
  what a TPU or GPU would run, e.g. for cross-platform lowering). dtype='auto' is chosen for the
  backend, and the attention is decided here, once, as one plan for every layer:
  config.model.attention_impl's form, or for 'auto' the `measured` form of each layer shape
  (attention/measure.py) over the backend's rule (attention/choose.py)."""
  model_checks.validate_config(config)
  return build_model(config, backend, measured)


def build_model(
  config: ml_collections.ConfigDict,
  backend: str | None = None,
  measured: Sequence[tuple[str, str]] = (),
) -> HaloNet | byob.ByobNet:
  """create_model's network without its checks, for a caller that has run them (a run checks
  its whole config once, train/config_checks.py)."""
  backend = backend or jax.default_backend()
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
  if fields['dtype'] == 'auto':
    fields['dtype'] = AUTO_DTYPE.get(backend, 'bfloat16')
  plan = attention.plan(fields.pop('attention_impl'), backend, measured)
  arch = fields.pop('arch')
  if arch:  # One of timm's halo networks; the HaloNet fields do not apply.
    return byob.ByobNet(
      arch=arch,
      num_classes=config.num_classes,
      attention=plan,
      stochastic_depth_rate=fields['stochastic_depth_rate'],
      dropout_rate=fields['dropout_rate'],
      dtype=fields['dtype'],
    )
  return HaloNet(num_classes=config.num_classes, attention=plan, **fields)


def abstract_variables(config: ml_collections.ConfigDict) -> Any:
  """Shapes of all variables via jax.eval_shape: free even for H7 at 600 px."""
  model = create_model(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)


def param_count(params: Any) -> int:
  """The number of values in a parameter tree, abstract or concrete."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def count_params(config: ml_collections.ConfigDict) -> int:
  """Trainable parameters (BN running statistics excluded), from shapes alone."""
  return param_count(abstract_variables(config)['params'])
