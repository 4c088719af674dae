"""'auto' on an accelerator: each distinct attention layer timed with every form that runs here.

Which form is fastest depends on the chip, the layer's shape and the compiler, none of which the
machine that wrote this code had: so, as cuDNN and Triton autotune, the program decides on the
user's device. For each distinct layer of the model (map size, channels, heads, b, h, stride,
mask, dtype, per-device batch) every candidate of this backend runs forward and backward on
random inputs of that shape; one whose output or gradients disagree with the plain form's, or
that fails to lower, compile or run, is skipped and named. The fastest correct one is used.

Results are kept in a cache keyed by device kind, JAX version and layer shape (a second run on
the same kind of chip measures nothing), and each run records its choice in its workdir
(attention_choice.json), so a resumed run keeps its forms and stays bit-exact. On CPU 'auto'
keeps the fixed rule of choose.py unless HALONET_MEASURE_ATTENTION=1.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import json
import os
import statistics
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from halonet import paths
from halonet.attention import choose
from halonet.attention.layer import HaloAttention
from halonet.attention.layer import layer_shape

CHOICE_FILE = 'attention_choice.json'
CANDIDATES = {
  'tpu': ('plain', 'pallas'),
  'gpu': ('plain', 'dense', 'pallas_gpu'),
  'cpu': ('plain', 'rows'),
}
MEASURED_BACKENDS = ('tpu', 'gpu')
# Largest |difference| / largest |plain value| accepted, output and every gradient.
TOLERANCE = {'float32': 1e-3, 'bfloat16': 5e-2}
WARMUP, ITERATIONS = 2, 5


@dataclasses.dataclass(frozen=True)
class Layer:
  """One distinct attention layer of a model, as one device runs it."""

  batch: int  # Per device.
  shape: choose.LayerShape

  def key(self) -> str:
    """What the layer looks its form up by (AttentionPlan.form): everything but the batch."""
    return self.shape.key()

  def module(self, form: str) -> HaloAttention:
    s = self.shape
    return HaloAttention(
      qk_width=s.qk_width,
      value_width=s.value_width,
      num_heads=s.num_heads,
      block_size=s.block_size,
      halo_size=s.halo_size,
      stride=s.stride,
      mask_window=s.mask_window,
      attention=choose.AttentionPlan(form),
      dtype=jnp.dtype(s.dtype),
    )

  def as_json(self) -> dict[str, Any]:
    return {'batch': self.batch, **dataclasses.asdict(self.shape)}


def model_layers(model: nn.Module, image_size: int, batch: int) -> list[Layer]:
  """The distinct attention layers `model` runs on `batch` images per device, from shapes alone."""
  found = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, HaloAttention) and context.method_name == '__call__':
      layer = Layer(batch, layer_shape(module, args[0].shape))
      found.setdefault(layer.key(), layer)
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(
      functools.partial(model.init, train=False),
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)},
      images,
    )
  return list(found.values())


def _forward_backward(layer: Layer, form: str) -> Callable[..., Any]:
  """(params, x, cotangent) -> (output, parameter gradients, input gradient), jitted."""
  module = layer.module(form)

  def run(params, x, cotangent):
    out, pullback = jax.vjp(lambda p, x: module.apply({'params': p}, x), params, x)
    return (out, *pullback(cotangent))

  return jax.jit(run)


def time_compiled(compiled: Callable[..., Any], args: Sequence[Any]) -> float:
  """Median seconds of `compiled(*args)` after WARMUP runs, each waited for."""
  for _ in range(WARMUP):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(ITERATIONS):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _relative_error(got: Any, want: Any) -> float:
  errors = [
    float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32))))
    / max(float(np.max(np.abs(np.asarray(w, np.float32)))), 1e-30)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
  ]
  return max(errors)


def measure_layer(
  layer: Layer,
  candidates: Sequence[str],
  timer: Callable[[Callable[..., Any], Sequence[Any]], float] = time_compiled,
) -> dict[str, Any]:
  """{'choice', 'seconds': {form: s}, 'skipped': {form: why}} of one layer (forward+backward)."""
  keys = jax.random.split(jax.random.key(0), 3)
  shape = (layer.batch, layer.shape.height, layer.shape.width, layer.shape.channels)
  dtype = layer.shape.dtype
  x = jax.random.normal(keys[0], shape, jnp.float32).astype(dtype)
  params = layer.module('plain').init(keys[1], x)['params']
  reference = None
  seconds, skipped = {}, {}
  for impl in dict.fromkeys(('plain', *candidates)):
    try:
      fn = _forward_backward(layer, impl)
      out_shape = jax.eval_shape(lambda p, x: layer.module(impl).apply({'params': p}, x), params, x)
      cotangent = jax.random.normal(keys[2], out_shape.shape, jnp.float32).astype(dtype)
      args = (params, x, cotangent)
      compiled = fn.lower(*args).compile()
      result = jax.device_get(compiled(*args))
      if reference is None:
        reference = result
      else:
        error = _relative_error(result, reference)
        if not error <= TOLERANCE[dtype]:
          raise ValueError(
            f'disagrees with plain (relative error {error:.2g} > {TOLERANCE[dtype]:g})'
          )
      seconds[impl] = timer(compiled, args)
    except Exception as e:  # pylint: disable=broad-except  # Any failure rules a form out.
      if impl == 'plain':
        raise
      skipped[impl] = ' '.join(str(e).split())[:200] or type(e).__name__
      logging.warning(
        'attention form %s skipped for layer %s: %s', impl, layer.key(), skipped[impl]
      )
  return {'choice': min(seconds, key=seconds.get), 'seconds': seconds, 'skipped': skipped}


def cache_file() -> str:
  return os.path.join(
    os.path.expanduser(os.environ.get('HALONET_CACHE', '~/.cache/halonet')),
    'attention_choices.json',
  )


def _cache_key(layer: Layer) -> str:
  return (
    f'{jax.devices()[0].device_kind} | jax {jax.__version__} | batch {layer.batch} | {layer.key()}'
  )


def choose_layers(
  layers: Sequence[Layer], backend: str, say: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
  """{layer key: record} for `layers`, measured or read from the cache (which gains the new)."""
  cache_path = cache_file()
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      cache = json.load(f)
  records = {}
  for layer in layers:
    record = cache.get(_cache_key(layer))
    source = 'cached'
    if record is None:
      record = measure_layer(layer, CANDIDATES[backend])
      cache[_cache_key(layer)] = record
      source = 'measured'
    records[layer.key()] = {**record, 'layer': layer.as_json()}
    times = ', '.join(f'{impl} {t * 1e3:.3g} ms' for impl, t in record['seconds'].items())
    skipped = ''.join(f'; {impl} skipped' for impl in record['skipped'])
    say(
      f'attention {layer.key()} batch {layer.batch}: {times}{skipped} -> {record["choice"]} '
      f'({source})'
    )
  os.makedirs(os.path.dirname(cache_path), exist_ok=True)
  tmp = f'{cache_path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(cache, f, indent=2, sort_keys=True)
  os.replace(tmp, cache_path)
  return records


def measures(attention_impl: str, backend: str) -> bool:
  """Whether 'auto' measures on `backend` (HALONET_MEASURE_ATTENTION=1: on any backend)."""
  forced = os.environ.get('HALONET_MEASURE_ATTENTION', '') == '1'
  return attention_impl == 'auto' and (backend in MEASURED_BACKENDS or forced)


def as_choice(records: dict[str, dict[str, Any]]) -> tuple[tuple[str, str], ...]:
  """The (layer key, form) pairs measured (AttentionPlan.measured)."""
  return tuple(sorted((key, record['choice']) for key, record in records.items()))


def _record(workdir: paths.PathLike) -> dict[str, Any] | None:
  target = paths.path(workdir) / CHOICE_FILE
  return paths.read_json(target) if target.exists() else None


def recorded_choice(workdir: paths.PathLike) -> tuple[tuple[str, str], ...] | None:
  """The choice a run recorded in its workdir on this kind of device, or None."""
  record = _record(workdir)
  if record is None or record['device_kind'] != jax.devices()[0].device_kind:
    return None
  return as_choice(record['layers'])


def _broadcast_json(obj: Any) -> Any:
  """Process 0's `obj` on every process (JSON through two broadcasts: length, then bytes)."""
  if jax.process_count() == 1:
    return obj
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if jax.process_index() == 0 else None
  length = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if data is not None else 0)))
  buffer = data if data is not None else np.zeros(length, np.uint8)
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def for_run(
  model: nn.Module,
  attention_impl: str,
  image_size: int,
  per_device_batch: int,
  workdir: paths.PathLike,
  say: Callable[[str], None] = print,
) -> tuple[tuple[str, str], ...]:
  """The run's choice: its workdir's record if it has one, else measured on process 0 and used by
  every process, then recorded. () when 'auto' does not measure here (choose.py's rule)."""
  backend = jax.default_backend()
  if not measures(attention_impl, backend):
    return ()
  recorded = recorded_choice(workdir)
  if recorded is not None:
    return recorded
  records = None
  if jax.process_index() == 0:
    records = choose_layers(model_layers(model, image_size, per_device_batch), backend, say=say)
  records = _broadcast_json(records)
  earlier = _record(workdir)  # Made on another kind of device: kept beside the new one.
  if earlier is not None:
    paths.write_json(
      paths.unused_path(paths.path(workdir) / 'attention_choice.earlier.json'), earlier
    )
  paths.write_json(
    paths.path(workdir) / CHOICE_FILE,
    {
      'device_kind': jax.devices()[0].device_kind,
      'jax': jax.__version__,
      'backend': backend,
      'layers': records,
    },
  )
  choice = as_choice(records)
  logging.warning(
    'attention forms chosen on process 0 (%d layers): %s',
    len(choice),
    ' '.join(f'{key}={impl}' for key, impl in choice),
  )
  return choice
