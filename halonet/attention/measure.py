"""'auto' on an accelerator: each distinct attention layer timed with every form that runs here.

Which form is fastest depends on the chip, the layer's shape and the compiler, none of which the
machine that wrote this code had: so, as cuDNN and Triton autotune, the program decides on the
user's device. For each distinct layer of the model (map size, channels, heads, b, h, stride,
mask, dtype, per-device batch) every candidate of this backend runs forward and backward on
random inputs of that shape. Each, the plain form included, is checked against a float32
evaluation of the plain form at the highest matmul precision, in the dtype the run computes in:
its error may be at most what rounding in that dtype makes, as plain's own error measures it, and
it may not be systematically scaled (a bfloat16 form 1% off, or 0.5% off in one head, is
rounding's size in the largest value but not in its direction). A form that disagrees, or fails
to lower, compile or run, is skipped and named. The fastest correct one is used.

Results are kept in a cache keyed by what decides them: device kind, JAX version, the forms'
code, the candidates, the mesh, the per-device batch and the layer's shape (with its dtype); a
cached choice is checked once more (one forward and backward) before it is used. Each run
records its choice and that key's parts in its workdir (attention_choice.json), so a resumed run
keeps its forms and stays bit-exact, and a resume after the forms' code changed measures again.
On CPU 'auto' keeps the fixed rule of choose.py unless HALONET_MEASURE_ATTENTION=1.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import statistics
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from halonet import paths
from halonet import sharding
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
# The relative rounding of one operation as each backend computes float32 matmuls by default:
# bfloat16 passes on TPU, TF32 on NVIDIA GPUs; on CPU float32's 2^-24, widened to 2^-17 for the
# forms' different orders of summation over long reductions. bfloat16 is 2^-8 everywhere.
FLOAT32_ROUNDING = {'tpu': 2**-8, 'gpu': 2**-11, 'cpu': 2**-17}
BFLOAT16_ROUNDING = 2**-8
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


def unit_rounding(dtype: str, backend: str | None = None) -> float:
  """The relative rounding of one operation in `dtype` on `backend` (default: JAX's)."""
  if dtype == 'bfloat16':
    return BFLOAT16_ROUNDING
  return FLOAT32_ROUNDING.get(backend or jax.default_backend(), BFLOAT16_ROUNDING)


@dataclasses.dataclass(frozen=True)
class Errors:
  """How far a form's output and gradients lie from the float32 reference, the worst over the
  output, each head's part of it and every gradient."""

  rms: float  # ||got - want|| / ||want||: any error, rounding's included.
  scale: float  # |<got, want> / <want, want> - 1|: a systematic one, which rounding does not make.

  def within(self, limit: 'Errors') -> bool:
    return self.rms <= limit.rms and self.scale <= limit.scale


def errors_against(got: Any, want: Any, num_heads: int) -> Errors:
  """`got` (output, parameter gradients, input gradient) against `want`, the same in float32."""
  pairs = [
    (np.asarray(g, np.float64).ravel(), np.asarray(w, np.float64).ravel())
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
  ]
  out, ref = (np.asarray(a, np.float64) for a in (got[0], want[0]))
  heads = [
    (
      o.reshape(*o.shape[:-1], num_heads, -1)[..., h, :].ravel(),
      r.reshape(o.shape[:-1] + (num_heads, -1))[..., h, :].ravel(),
    )
    for o, r in [(out, ref)]
    for h in range(num_heads)
  ]
  rms, scale = 0.0, 0.0
  for g, w in pairs + heads:
    norm = max(float(np.dot(w, w)), 1e-300)
    rms = max(rms, float(np.linalg.norm(g - w)) / np.sqrt(norm))
    scale = max(scale, abs(float(np.dot(g, w)) / norm - 1.0))
  return Errors(rms=rms, scale=scale)


def plain_limit(dtype: str, backend: str | None = None) -> Errors:
  """What plain may err by: a few roundings of `dtype`."""
  u = unit_rounding(dtype, backend)
  return Errors(rms=4 * u, scale=u)


def form_limit(dtype: str, plain: Errors, backend: str | None = None) -> Errors:
  """What another form may err by: twice plain's measured error (the spread of correct forms),
  its scale three times plain's, each at least what one rounding allows."""
  u = unit_rounding(dtype, backend)
  return Errors(rms=max(2 * plain.rms, 2 * u), scale=max(3 * plain.scale, u / 2))


def _reference(layer: Layer, args: Sequence[Any]) -> Any:
  """Output and gradients of the plain form in float32 at the highest matmul precision."""
  exact = Layer(layer.batch, dataclasses.replace(layer.shape, dtype='float32'))
  params, x, cotangent = args
  with jax.default_matmul_precision('highest'):
    return jax.device_get(
      _forward_backward(exact, 'plain')(
        params, x.astype(jnp.float32), cotangent.astype(jnp.float32)
      )
    )


def _inputs(layer: Layer) -> tuple[Any, Any, Any]:
  """(params, x, cotangent) of the layer's shape, fixed random values in its dtype."""
  keys = jax.random.split(jax.random.key(0), 3)
  shape = (layer.batch, layer.shape.height, layer.shape.width, layer.shape.channels)
  x = jax.random.normal(keys[0], shape, jnp.float32).astype(layer.shape.dtype)
  module = layer.module('plain')
  params = module.init(keys[1], x)['params']
  out = jax.eval_shape(lambda p, x: module.apply({'params': p}, x), params, x)
  cotangent = jax.random.normal(keys[2], out.shape, jnp.float32).astype(layer.shape.dtype)
  return params, x, cotangent


def _check(layer: Layer, form: str, result: Any, reference: Any, limit: Errors) -> Errors:
  """The form's errors; raises (naming both) where they pass `limit`."""
  errors = errors_against(result, reference, layer.shape.num_heads)
  if not errors.within(limit):
    raise ValueError(
      f'{form} disagrees with a float32 evaluation: relative error {errors.rms:.2g} (limit '
      f'{limit.rms:.2g}), scaled by {errors.scale:.2g} (limit {limit.scale:.2g})'
    )
  return errors


def measure_layer(
  layer: Layer,
  candidates: Sequence[str],
  timer: Callable[[Callable[..., Any], Sequence[Any]], float] = time_compiled,
) -> dict[str, Any]:
  """{'choice', 'seconds': {form: s}, 'skipped': {form: why}, 'errors': {form: {rms, scale}}}
  of one layer (forward+backward); plain is always run first, as the measure of rounding."""
  args = _inputs(layer)
  reference = _reference(layer, args)
  seconds, skipped, measured = {}, {}, {}
  dtype, limit = layer.shape.dtype, None
  for impl in dict.fromkeys(('plain', *candidates)):
    try:
      compiled = _forward_backward(layer, impl).lower(*args).compile()
      result = jax.device_get(compiled(*args))
      errors = _check(
        layer, impl, result, reference, plain_limit(dtype) if limit is None else limit
      )
      if impl == 'plain':  # Always first: the others are held to its measured spread.
        limit = form_limit(dtype, errors)
      measured[impl] = dataclasses.asdict(errors)
      seconds[impl] = timer(compiled, args)
    except Exception as e:  # pylint: disable=broad-except  # Any failure rules a form out.
      if impl == 'plain':
        raise
      skipped[impl] = ' '.join(str(e).split())[:200] or type(e).__name__
      logging.warning(
        'attention form %s skipped for layer %s: %s', impl, layer.key(), skipped[impl]
      )
  return {
    'choice': min(seconds, key=seconds.get),
    'seconds': seconds,
    'skipped': skipped,
    'errors': measured,
  }


def recheck(layer: Layer, form: str) -> str | None:
  """Why a cached `form` no longer passes for `layer` (one forward and backward of it and of
  plain, against the float32 reference), or None."""
  args = _inputs(layer)
  reference = _reference(layer, args)
  try:
    plain = jax.device_get(_forward_backward(layer, 'plain')(*args))
    dtype = layer.shape.dtype
    limit = form_limit(dtype, _check(layer, 'plain', plain, reference, plain_limit(dtype)))
    if form != 'plain':
      _check(layer, form, jax.device_get(_forward_backward(layer, form)(*args)), reference, limit)
  except Exception as e:  # pylint: disable=broad-except  # Any failure rules the record out.
    return ' '.join(str(e).split())[:200] or type(e).__name__
  return None


# The modules whose code decides which forms exist, what they compute and how they are judged.
_FORM_MODULES = (
  'common',
  'plain',
  'rows',
  'dense',
  'pallas',
  'pallas_kernels',
  'pallas_gpu',
  'spatial',
  'layer',
  'choose',
  'measure',
)


def forms_version() -> str:
  """A hash of the forms' code: a measurement made by other code is not reused."""
  digest = hashlib.sha256()
  for name in _FORM_MODULES:
    digest.update((pathlib.Path(__file__).parent / f'{name}.py').read_bytes())
  return digest.hexdigest()[:16]


def measured_with(backend: str, mesh_shape: dict[str, int] | None = None) -> dict[str, Any]:
  """Everything besides the layer that decides a measurement: the key's parts, as recorded."""
  return {
    'device_kind': jax.devices()[0].device_kind,
    'jax': jax.__version__,
    'forms_version': forms_version(),
    'candidates': list(CANDIDATES[backend]),
    'mesh': dict(mesh_shape or {}),
  }


def cache_file() -> str:
  return os.path.join(
    os.path.expanduser(os.environ.get('HALONET_CACHE', '~/.cache/halonet')),
    'attention_choices.json',
  )


def _cache_key(layer: Layer, context: dict[str, Any]) -> str:
  mesh = ','.join(f'{axis}={size}' for axis, size in context['mesh'].items()) or '-'
  return (
    f'{context["device_kind"]} | jax {context["jax"]} | forms {context["forms_version"]} | '
    f'candidates {",".join(context["candidates"])} | mesh {mesh} | batch {layer.batch} | '
    f'{layer.key()}'
  )


def choose_layers(
  layers: Sequence[Layer],
  backend: str,
  say: Callable[[str], None] = print,
  mesh_shape: dict[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
  """{layer key: record} for `layers`, measured or read from the cache (which gains the new); a
  cached choice that no longer passes the check is measured again, and said so."""
  cache_path = cache_file()
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      cache = json.load(f)
  context = measured_with(backend, mesh_shape)
  records = {}
  for layer in layers:
    key = _cache_key(layer, context)
    record = cache.get(key)
    source = 'cached'
    if record is not None:
      why = recheck(layer, record['choice'])
      if why:
        say(f'attention {layer.key()}: the cached {record["choice"]} fails its check ({why})')
        record = None
    if record is None:
      record = measure_layer(layer, CANDIDATES[backend])
      cache[key] = record
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


def stale(record: dict[str, Any], mesh_shape: dict[str, int] | None = None) -> str | None:
  """Why a recorded choice does not hold here (another kind of device, other forms' code or
  candidates, another mesh), or None."""
  now = measured_with(record.get('backend', jax.default_backend()), mesh_shape)
  for part in ('device_kind', 'forms_version', 'candidates', *(('mesh',) if mesh_shape else ())):
    if record.get(part) != now[part]:
      return f"its {part} {record.get(part)!r} is not this run's {now[part]!r}"
  return None


def recorded_choice(
  workdir: paths.PathLike, mesh_shape: dict[str, int] | None = None
) -> tuple[tuple[str, str], ...] | None:
  """The choice a run recorded in its workdir, if it still holds here (`stale`), or None."""
  record = _record(workdir)
  if record is None or stale(record, mesh_shape):
    return None
  return as_choice(record['layers'])


def for_run(
  model: nn.Module,
  attention_impl: str,
  image_size: int,
  per_device_batch: int,
  workdir: paths.PathLike,
  say: Callable[[str], None] = print,
  mesh_shape: dict[str, int] | None = None,
) -> tuple[tuple[str, str], ...]:
  """The run's choice: its workdir's record if it still holds, else measured on process 0 and
  used by every process, then recorded. () when 'auto' does not measure here (choose.py's rule)."""
  backend = jax.default_backend()
  if not measures(attention_impl, backend):
    return ()
  earlier = _record(workdir)
  if earlier is not None:
    why = stale(earlier, mesh_shape)
    if why is None:
      return as_choice(earlier['layers'])
    say(f'the attention forms recorded in {CHOICE_FILE} do not hold here ({why}): measuring again')
  records = None
  if jax.process_index() == 0:
    layers = model_layers(model, image_size, per_device_batch)
    records = choose_layers(layers, backend, say=say, mesh_shape=mesh_shape)
  records = sharding.broadcast_json(records, 'the measured attention forms')
  if earlier is not None:  # Kept beside the new one.
    paths.write_json(
      paths.unused_path(paths.path(workdir) / 'attention_choice.earlier.json'), earlier
    )
  paths.write_json(
    paths.path(workdir) / CHOICE_FILE,
    {**measured_with(backend, mesh_shape), 'backend': backend, 'layers': records},
  )
  choice = as_choice(records)
  logging.warning(
    'attention forms chosen on process 0 (%d layers): %s',
    len(choice),
    ' '.join(f'{key}={impl}' for key, impl in choice),
  )
  return choice
