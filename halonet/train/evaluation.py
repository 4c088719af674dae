"""Exact evaluation: padded batches carry a mask, so every example counts exactly once; a run's
splits and its config.evals (halonet/evaluators) with its raw and EMA parameters; a saved
checkpoint evaluated and recorded (eval.py)."""

from collections.abc import Callable
import datetime
import functools
import time
from typing import Any

from absl import logging
from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections

from halonet import console
from halonet import paths
from halonet import sharding
from halonet import text_table
from halonet.data import pipeline as input_pipeline
from halonet.data import preprocessing
from halonet.evaluators import run as evaluators_lib
from halonet.evaluators import specs as evaluator_specs
from halonet.models import keys as model_keys
from halonet.models import networks
from halonet.train import config_checks
from halonet.train import event_writer
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib

EVAL_BATCH_KEYS = ('image', 'label', 'mask')  # mask: False on the padding of the last batch.
PROGRESS_SECONDS = 30.0  # A longer evaluation prints how far it is this often.
EVENTS_FOLDER = 'eval'  # eval.py's TensorBoard events, under the workdir.


def eval_step(
  variables: Any,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  config: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
  """Sums (not means) over the real rows of one batch, so batches add up exactly."""
  images = preprocessing.normalize_images(batch['image'], config.input, jnp.dtype(model.dtype))
  logits = model.apply(variables, images, train=False).astype(jnp.float32)
  labels, mask = batch['label'], batch['mask']
  loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], axis=-1)
  # Integer counts stay exact however large the split.
  return {
    'count': jnp.sum(mask, dtype=jnp.int32),
    'loss': jnp.sum(jnp.where(mask, loss, 0.0)),
    'top1': jnp.sum(mask & (jnp.argmax(logits, -1) == labels), dtype=jnp.int32),
    'top5': jnp.sum(mask & top5, dtype=jnp.int32),
  }


def make_eval_step(model: nn.Module, mesh: Mesh, config: ml_collections.ConfigDict):
  """Jitted eval step: variables replicated, batch as `batch_shardings`, sums replicated."""
  return jax.jit(
    sharding.traced_within(mesh, functools.partial(eval_step, model=model, config=config)),
    in_shardings=(sharding.replicated(mesh), sharding.batch_shardings(mesh, EVAL_BATCH_KEYS)),
    out_shardings=sharding.replicated(mesh),
  )


def compile_eval_step(
  model: nn.Module, mesh: Mesh, abstract_variables: Any, config: ml_collections.ConfigDict
) -> tuple[Callable[..., Any], float]:
  """The eval step compiled ahead for global batches of config.eval_batch_size, and the seconds
  that took: no evaluation's images/s then includes compilation."""
  size, batch = config.image_size, config.eval_batch_size
  spec = {  # Placed by make_eval_step's in_shardings.
    'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
    'label': jax.ShapeDtypeStruct((batch,), jnp.int32),
    'mask': jax.ShapeDtypeStruct((batch,), jnp.bool_),
  }
  start = time.perf_counter()
  compiled = make_eval_step(model, mesh, config).lower(abstract_variables, spec).compile()
  return compiled, time.perf_counter() - start


def evaluate(
  eval_fn,
  variables: Any,
  config: ml_collections.ConfigDict,
  split: str,
  num_examples: int,
  mesh: Mesh,
) -> dict[str, float]:
  """Top-1/top-5 (%) and mean loss over the whole split of `num_examples`, plus images/s.

  A long evaluation prints how far it is every PROGRESS_SECONDS.
  """
  batches, num_batches = input_pipeline.eval_pass(
    config.input,
    split,
    image_size=config.image_size,
    num_classes=config.num_classes,
    global_batch_size=config.eval_batch_size,
    split_size=num_examples,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  totals = None
  start = reported = time.perf_counter()
  for i, batch in enumerate(sharding.prefetch_to_device(batches, mesh), 1):
    sums = eval_fn(variables, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if time.perf_counter() - reported > PROGRESS_SECONDS:
      reported = time.perf_counter()
      console.say(f'eval {split}: batch {i}/{num_batches}, {reported - start:.0f} s')
  totals = jax.device_get(totals)
  seconds = time.perf_counter() - start
  count = int(totals['count'])
  if count != num_examples:
    raise RuntimeError(f'evaluated {count} examples of split {split!r} but it has {num_examples}')
  result = {
    'top1': 100.0 * float(totals['top1']) / count,
    'top5': 100.0 * float(totals['top5']) / count,
    'loss': float(totals['loss']) / count,
    'count': count,
    'images_per_sec': count / seconds,
  }
  return result


def evaluate_all(
  eval_fn,
  state: train_step_lib.TrainState,
  config: ml_collections.ConfigDict,
  sizes: dict[str, int],
  mesh: Mesh,
) -> dict[str, dict[str, dict[str, float]]]:
  """Every eval split with the raw params, and again with the EMA params when kept."""
  return {
    name: {
      split: evaluate(eval_fn, variables, config, split, sizes[split], mesh)
      for split in config.input.eval_splits
    }
    for name, variables in weights_of(state).items()
  }


def make_infer(
  model: nn.Module, mesh: Mesh, config: ml_collections.ConfigDict
) -> Callable[[Any], evaluators_lib.Infer]:
  """variables -> the evaluators' `infer`: logits and pre-logits features of the global batch,
  with the batch's other entries, in NumPy on every process. Compiled once per batch layout."""

  def outputs(variables: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    images = preprocessing.normalize_images(batch['image'], config.input, jnp.dtype(model.dtype))
    logits, sown = model.apply(variables, images, train=False, mutable=[model_keys.PRE_LOGITS])
    features = sown[model_keys.PRE_LOGITS][model_keys.PRE_LOGITS][0]
    rest = {k: v for k, v in batch.items() if k != 'image'}
    logits, features = logits.astype(jnp.float32), features.astype(jnp.float32)
    return {'logits': logits, 'pre_logits': features, **rest}

  jitted = jax.jit(sharding.traced_within(mesh, outputs), out_shardings=sharding.replicated(mesh))
  return lambda variables: (
    lambda batch: jax.device_get(jitted(variables, sharding.shard_batch(batch, mesh)))
  )


def weights_of(state: train_step_lib.TrainState) -> dict[str, Any]:
  """'raw' and (when kept) 'ema' variables of a state."""
  weights = {'raw': state.params}
  if state.ema_params is not None:
    weights['ema'] = state.ema_params
  return {name: {'params': p, 'batch_stats': state.batch_stats} for name, p in weights.items()}


def run_evaluators(
  evaluators: list[evaluator_specs.Evaluator],
  infer_of: Callable[[Any], evaluators_lib.Infer],
  state: train_step_lib.TrainState,
  config: ml_collections.ConfigDict,
  workdir: str,
  writer: metric_writers.MetricWriter,
) -> dict[str, dict[str, dict[str, Any]]]:
  """{spec: {weights: numbers}} of each evaluator with raw and EMA weights; each evaluator's
  records are appended to eval_records.jsonl and its scalars given to `writer` as soon as it is
  done (one that fails later loses nothing), and the results are printed as one table."""
  results, rows = {}, []
  step = int(state.step)
  for evaluator in evaluators:
    records = []
    for name, variables in weights_of(state).items():
      numbers = evaluators_lib.evaluate(config, evaluator, infer_of(variables))
      results.setdefault(evaluator.spec, {})[name] = numbers
      records.append(
        {
          'step': step,
          'evaluator': evaluator.spec,
          'dataset': evaluator.folder or evaluator.dataset,
          'split': ':'.join(evaluator.splits),
          'metric': evaluator.metric,
          'weights': name,
          'image_size': config.image_size,
          'crop_fraction': config.input.crop_fraction,
          'evaluated_at': _now(),
          **numbers,
        }
      )
      rows.append(
        {
          'evaluator': evaluator.spec,
          'weights': name,
          'result': evaluators_lib.summary(evaluator, numbers),
          'images': numbers['count'],
        }
      )
    workdir_lib.append_eval_records(workdir, records)
    writer.write_scalars(step, scalars_of({evaluator.spec: results[evaluator.spec]}))
  if rows:
    console.say(f'evaluators at step {step}:\n{text_table.format_table(rows)}')
  return results


def split_scalars(evals: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
  """TensorBoard scalars 'eval/WEIGHTS/SPLIT/NUMBER' of evaluate_all's results."""
  return {
    f'eval/{name}/{split}/{k}': v
    for name, splits in evals.items()
    for split, r in splits.items()
    for k, v in r.items()
  }


def scalars_of(evals: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
  """TensorBoard scalars 'evals/WEIGHTS/ENTRY/NUMBER' of run_evaluators' results (one level of
  nested numbers, such as mCE's per-corruption errors, flattened)."""
  scalars = {}
  for spec, by_weights in evals.items():
    for weights, numbers in by_weights.items():
      for key, value in numbers.items():
        inner = value if isinstance(value, dict) else {'': value}
        for part, number in inner.items():
          scalars[f'evals/{weights}/{spec}/{key}' + (f'/{part}' if part else '')] = float(number)
  return scalars


def _now() -> str:
  """When, in UTC to the second, as records from other hosts and runs are compared."""
  return datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, Any]:
  """Evaluates a saved step (default: latest) on config.input.eval_splits and config.evals and
  appends its records to workdir/eval_records.jsonl: one per (step, dataset, split or evaluator,
  weights), never replacing any."""
  config_checks.validate_config(config)
  workdir_lib.check_same_model(config, workdir)
  sizes = train_step_lib.split_sizes(config, train=False)
  evaluators = evaluator_specs.parse_all(config.evals)
  evaluators_lib.check_available(config, evaluators)
  mesh = sharding.create_mesh(config.mesh_shape)
  state, abstract, model = train_step_lib.restore_run(config, workdir, mesh, step)
  paths.check_writable(workdir, 'workdir')  # Its records are written there after evaluating.
  step = int(state.step)
  eval_fn, seconds = compile_eval_step(
    model, mesh, {'params': abstract.params, 'batch_stats': abstract.batch_stats}, config
  )
  logging.info('compiled the eval step in %.1f s', seconds)
  with jax.set_mesh(mesh):
    evals = evaluate_all(eval_fn, state, config, sizes, mesh)
  when = _now()
  records = [
    {
      'step': step,
      'dataset': config.input.dataset,
      'split': split,
      'weights': name,
      'image_size': config.image_size,
      'crop_fraction': config.input.crop_fraction,
      'evaluated_at': when,
      **r,
    }
    for name, splits in evals.items()
    for split, r in splits.items()
  ]
  for r in records:
    console.say(
      f'step {step} {r["dataset"]} {r["split"]} ({r["weights"]} params): top-1 '
      f'{r["top1"]:.2f}% top-5 {r["top5"]:.2f}% loss {r["loss"]:.4f} '
      f'{r["images_per_sec"]:.1f} img/s ({r["count"]} images)'
    )
  workdir_lib.append_eval_records(workdir, records)
  # Beside the training run's events, as TensorBoard's run 'eval'.
  writer = event_writer.create(
    workdir_lib.file(workdir, EVENTS_FOLDER), just_logging=jax.process_index() > 0
  )
  writer.write_scalars(step, split_scalars(evals))
  writer.flush()
  try:
    with jax.set_mesh(mesh):
      infer_of = make_infer(model, mesh, config)
      others = run_evaluators(evaluators, infer_of, state, config, workdir, writer)
  finally:
    writer.close()
  return {
    'step': step,
    'num_params': networks.param_count(abstract.params),
    **{f'{name}_eval': v for name, v in evals.items()},
    **({'evals': others} if others else {}),
  }
