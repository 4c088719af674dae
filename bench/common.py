"""What the benchmark sections share: round-robin timing, configs, compiled layers, layer shapes.

Imported after bench/run.py has set XLA_FLAGS, so nothing here touches jax at import time beyond
importing it.
"""

from collections.abc import Callable
import functools
import json
import resource
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from configs import halonet as named_configs
from halonet import attention
from halonet.models import halonet as model_lib
from halonet.models import networks

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def best_of(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
  """The fastest run of each callable, run round-robin so drifts in CPU load hit all of them.

  Each run also records the kernel CPU time and page faults it caused (process-wide, but only
  the timed callable is running): on a VM, a step that gets fresh pages from the kernel pays for
  zeroing them, and that cost depends on what else freed memory.
  """
  for fn in fns.values():
    fn()  # Warm-up (compilation, allocator).
  runs = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(0.2)  # Lets the previous call's worker threads (XLA's or OpenMP's) go idle.
      before = resource.getrusage(resource.RUSAGE_SELF)
      start = time.perf_counter()
      fn()
      seconds = time.perf_counter() - start
      after = resource.getrusage(resource.RUSAGE_SELF)
      runs[name].append(
        {
          'seconds': seconds,
          'kernel_seconds': after.ru_stime - before.ru_stime,
          'page_faults': after.ru_minflt - before.ru_minflt,
        }
      )
  return {name: min(r, key=lambda run: run['seconds']) for name, r in runs.items()}


def seconds_of(timings: dict[str, dict[str, float]]) -> dict[str, float]:
  """Just the seconds of best_of's runs."""
  return {name: run['seconds'] for name, run in timings.items()}


def variant_config(name: str, *, tiny: bool = False, **overrides: Any) -> ml_collections.ConfigDict:
  """The paper's variant `name`; `tiny` keeps one block per stage at an eighth of the image size,
  at least 64 px (the smoke test's shapes). `overrides` are flattened config fields, e.g.
  {'model.remat': True}."""
  config = named_configs.get_config(name)
  if tiny:
    config.model.stage_depths = (1, 1, 1, 1)
    config.image_size = max(2 * model_lib.MIN_IMAGE_SIZE, config.image_size // 8)
  config.update_from_flattened_dict(overrides)
  return config


@functools.cache
def initialized_train_step(
  config_json: str, batch: int, measured: tuple[tuple[str, str], ...] = ()
):
  """A compiled SGD-momentum train step (forward, backward, update) and its initial arguments;
  with 'auto' attention, each layer's form from the `measured` ones (measure.py).

  Cached on the config, so a later section can reuse the timed step's compilation.
  """
  import optax  # pylint: disable=import-outside-toplevel

  config = ml_collections.ConfigDict(json.loads(config_json))
  model = networks.create_model(config, measured=measured)
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  images = jnp.zeros((batch, config.image_size, config.image_size, 3), jnp.float32)
  labels = jnp.zeros((batch,), jnp.int32)
  variables = jax.jit(lambda rng: model.init(rng, images[:1], train=False))(jax.random.key(0))
  params, batch_stats = variables['params'], variables['batch_stats']

  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
      )
      one_hot = jax.nn.one_hot(labels, logits.shape[-1])
      return optax.softmax_cross_entropy(logits, one_hot).mean(), updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  args = (params, batch_stats, tx.init(params), images, labels)
  return jax.jit(step, donate_argnums=(0, 1, 2)).lower(*args).compile(), args


def timed_train_step(
  config: ml_collections.ConfigDict, batch: int, measured: tuple[tuple[str, str], ...] = ()
) -> Callable[[], None]:
  """A callable running one train step of `config` (state carried across calls), blocking."""
  step, args = initialized_train_step(config.to_json(), batch, measured)
  state = list(args)

  def run():
    out = step(*state)
    jax.block_until_ready(out)
    state[:3] = out[:3]

  return run


def attention_layer_shapes(
  config: ml_collections.ConfigDict, tiny: bool = False
) -> list[dict[str, Any]]:
  """Each distinct HaloAttention call of `config`'s model at its image size (batch 1); `tiny`:
  the first two (a stride-1 and a strided layer).

  Read off the model itself (shapes only, via eval_shape): the input map and the layer's fields,
  named after the first block that makes the call, with how many blocks repeat it.
  """
  net = networks.create_model(config)
  found: dict[tuple, dict[str, Any]] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, attention.HaloAttention) and context.method_name == '__call__':
      fields = {
        k: getattr(module, k)
        for k in ('qk_width', 'value_width', 'num_heads', 'block_size', 'halo_size', 'stride')
      }
      key = (args[0].shape[1:], tuple(fields.values()))
      entry = found.setdefault(
        key, {'name': module.parent.name, 'input': list(args[0].shape[1:]), **fields, 'count': 0}
      )
      entry['count'] += 1
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), images)
  return list(found.values())[: 2 if tiny else None]


def attention_fwd_bwd(
  layer: dict[str, Any],
  batch: int,
  dtype: Any,
  impl: str,
  *,
  height: int | None = None,
  **changes: Any,
):
  """Compiled grad of sum(HaloAttention(x)) wrt params and x, and its arguments.

  `layer` is an `attention_layer_shapes` entry; `height` overrides the input height and
  `changes` the layer's fields (e.g. block_size for global attention).
  """
  fields = {
    k: layer[k]
    for k in ('qk_width', 'value_width', 'num_heads', 'block_size', 'halo_size', 'stride')
  }
  fields.update(changes)
  net = attention.HaloAttention(**fields, attention=attention.AttentionPlan(impl), dtype=dtype)
  h, w, c = layer['input']
  x = jax.random.normal(jax.random.key(0), (batch, height or h, w, c))
  params = jax.jit(net.init)(jax.random.key(1), x[:1])['params']
  loss = lambda p, x: net.apply({'params': p}, x).astype(jnp.float32).sum()
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile(), (params, x)


def compiled_bytes(compiled) -> dict[str, int]:
  """Temp, argument and output bytes of a compiled executable (XLA's static buffer plan)."""
  m = compiled.memory_analysis()
  parts = {
    'temp': m.temp_size_in_bytes,
    'argument': m.argument_size_in_bytes,
    'output': m.output_size_in_bytes,
  }
  return {**parts, 'total': sum(parts.values())}
