"""Runs the evaluators of config.evals (specs.py) on one set of weights, through `infer`.

`infer(batch)` applies the model to a batch of this process's examples and returns the whole
global batch in NumPy, the same on every process: 'logits' [B, C], 'pre_logits' [B, D] and the
batch's own entries ('label', 'mask', 'real_label'). The scores (scores.py) are then NumPy.
"""

from collections.abc import Callable
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from halonet import console
from halonet.data import digits
from halonet.data import imagenet_classes
from halonet.data import pipeline
from halonet.data import sources
from halonet.evaluators import scores
from halonet.evaluators import specs

Infer = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
PROGRESS_SECONDS = 30.0  # A long evaluation says how far it is this often.
ANY_LABEL = 2**31 - 1  # A probe's labels are its own dataset's, not the model's classes.


def corrupted_datasets() -> list[tuple[str, int, str]]:
  """(corruption, severity, TFDS name) of every ImageNet-C configuration mCE averages."""
  return [
    (c, s, f'imagenet2012_corrupted/{c}_{s}')
    for c in scores.ALEXNET_CORRUPTION_ERRORS
    for s in scores.SEVERITIES
  ]


def input_of(
  config: ml_collections.ConfigDict, evaluator: specs.Evaluator, dataset: str | None = None
) -> ml_collections.ConfigDict:
  """config.input reading the evaluator's dataset (or `dataset`): an image folder from its path,
  a TFDS set from the run's TFDS data_dir, digits from the run's digits root."""
  data = ml_collections.ConfigDict(config.input.to_dict())
  data.dataset = dataset or evaluator.dataset
  same_kind = sources.is_folder(config.input.dataset) == sources.is_folder(data.dataset)
  data.data_dir = evaluator.folder or (config.input.data_dir if same_kind else '')
  if digits.classes_of(data.dataset) and not digits.classes_of(config.input.dataset):
    data.data_dir = ''
  return data


def reads(
  config: ml_collections.ConfigDict, evaluator: specs.Evaluator
) -> list[tuple[ml_collections.ConfigDict, str]]:
  """(data, split) of every read the evaluator makes."""
  if evaluator.metric == specs.MCE:
    return [
      (input_of(config, evaluator, name), evaluator.splits[0]) for *_, name in corrupted_datasets()
    ]
  return [(input_of(config, evaluator), split) for split in evaluator.splits]


def check_available(config: ml_collections.ConfigDict, evaluators: list[specs.Evaluator]) -> None:
  """Every split the evaluators read can be read: a missing one stops here, named in one line
  with where it was looked for and how to prepare it, before anything compiles."""
  for evaluator in evaluators:
    for data, split in reads(config, evaluator):
      sources.num_examples(data, split, ANY_LABEL)


def _outputs(
  config: ml_collections.ConfigDict,
  data: ml_collections.ConfigDict,
  split: str,
  infer: Infer,
  keep: tuple[str, ...],
  what: str,
  num_classes: int,
) -> tuple[dict[str, np.ndarray], float]:
  """`keep` of the model's outputs for every example of `split` (padding dropped, in the read's
  order), and the images/s; `num_classes` bounds the labels (ANY_LABEL: a probe's own)."""
  total = sources.num_examples(data, split, ANY_LABEL)
  batches, count = pipeline.eval_pass(
    data,
    split,
    image_size=config.image_size,
    num_classes=num_classes,
    global_batch_size=config.eval_batch_size,
    split_size=total,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  kept = {k: [] for k in keep}
  start = reported = time.perf_counter()
  for i, batch in enumerate(batches, 1):
    out = infer(batch)
    for k in keep:
      kept[k].append(out[k][out['mask']])
    if time.perf_counter() - reported > PROGRESS_SECONDS:
      reported = time.perf_counter()
      console.say(f'{what}: batch {i}/{count}, {reported - start:.0f} s')
  joined = {k: np.concatenate(v) for k, v in kept.items()}
  return joined, total / (time.perf_counter() - start)


def _top1_top5(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  top5 = np.argsort(-logits, axis=-1, kind='stable')[:, :5]
  return {
    'top1': 100.0 * float(np.mean(np.argmax(logits, -1) == labels)),
    'top5': 100.0 * float(np.mean(np.any(top5 == labels[:, None], axis=-1))),
  }


def evaluate(
  config: ml_collections.ConfigDict, evaluator: specs.Evaluator, infer: Infer
) -> dict[str, Any]:
  """The evaluator's numbers (percentages), 'count' (examples scored) and 'images_per_sec'."""
  what = evaluator.spec
  if evaluator.metric == specs.FEWSHOT:
    return _few_shot(config, evaluator, infer)
  if evaluator.metric == specs.MCE:
    errors_of, seen, seconds = {}, 0, 0.0
    for (corruption, severity, _), (data, split) in zip(
      corrupted_datasets(), reads(config, evaluator)
    ):
      keep = ('logits', 'label')
      out, rate = _outputs(config, data, split, infer, keep, what, config.num_classes)
      top1 = np.mean(np.argmax(out['logits'], -1) == out['label'])
      errors_of.setdefault(corruption, {})[severity] = 1.0 - float(top1)
      seen, seconds = seen + len(out['label']), seconds + len(out['label']) / rate
    mce, each = scores.mean_corruption_error(errors_of)
    return {
      'mce': 100.0 * mce,
      'corruption_errors': {c: 100.0 * e for c, e in each.items()},
      'count': seen,
      'images_per_sec': seen / seconds,
    }
  ((data, split),) = reads(config, evaluator)
  keep = ('logits', 'label') + ((sources.REAL_LABELS,) if evaluator.metric == specs.REAL else ())
  out, rate = _outputs(config, data, split, infer, keep, what, config.num_classes)
  logits, labels = out['logits'], out['label']
  if evaluator.metric == specs.REAL:
    label_sets = [np.flatnonzero(row) for row in out[sources.REAL_LABELS]]
    right, counted = scores.real_top1(logits, label_sets)
    numbers = {'real_top1': 100.0 * right / max(counted, 1), 'count': counted}
    numbers['original_top1'] = _top1_top5(logits, labels)['top1']
  elif evaluator.metric == specs.SUBSET:
    classes = imagenet_classes.subset_indices(evaluator.dataset)
    numbers = {
      'top1': 100.0 * scores.subset_top1(logits, labels, classes) / len(labels),
      'count': len(labels),
    }
  else:
    numbers = {**_top1_top5(logits, labels), 'count': len(labels)}
  return {**numbers, 'images_per_sec': rate}


def _few_shot(
  config: ml_collections.ConfigDict, evaluator: specs.Evaluator, infer: Infer
) -> dict[str, Any]:
  """Mean and spread over config.fewshot_seeds draws of each of config.fewshot_shots; a shot
  count above the smallest class of the train split is left out, said in one line."""
  (train_data, train_split), (test_data, test_split) = reads(config, evaluator)
  keep = ('pre_logits', 'label')
  train, train_rate = _outputs(
    config, train_data, train_split, infer, keep, evaluator.spec, ANY_LABEL
  )
  test, test_rate = _outputs(config, test_data, test_split, infer, keep, evaluator.spec, ANY_LABEL)
  num_classes = int(max(train['label'].max(), test['label'].max())) + 1
  fewest = int(np.bincount(train['label'])[np.unique(train['label'])].min())
  numbers: dict[str, Any] = {}
  for shots in config.fewshot_shots:
    if shots > fewest:
      console.say(
        f'{evaluator.spec}: {shots} shots left out: a class of {train_split} has {fewest} examples'
      )
      continue
    mean, spread = scores.few_shot_accuracy(
      (train['pre_logits'], train['label']),
      (test['pre_logits'], test['label']),
      shots=shots,
      seeds=range(config.fewshot_seeds),
      num_classes=num_classes,
      l2=config.fewshot_l2,
    )
    numbers[f'{shots}shot'], numbers[f'{shots}shot_std'] = 100.0 * mean, 100.0 * spread
  seen = len(train['label']) + len(test['label'])
  seconds = len(train['label']) / train_rate + len(test['label']) / test_rate
  return {**numbers, 'count': len(test['label']), 'images_per_sec': seen / seconds}


def summary(evaluator: specs.Evaluator, numbers: dict[str, Any]) -> str:
  """The evaluator's numbers in a few words, for its row of the printed table."""
  if evaluator.metric == specs.FEWSHOT:
    shots = [k[: -len('shot')] for k in numbers if k.endswith('shot')]
    return ' '.join(
      f'{k}-shot {numbers[f"{k}shot"]:.1f}±{numbers[f"{k}shot_std"]:.1f}%' for k in shots
    )
  if evaluator.metric == specs.MCE:
    return f'mCE {numbers["mce"]:.1f}%'
  if evaluator.metric == specs.REAL:
    return f'ReaL top-1 {numbers["real_top1"]:.2f}%'
  if evaluator.metric == specs.SUBSET:
    return f'top-1 {numbers["top1"]:.2f}% (200 classes)'
  return f'top-1 {numbers["top1"]:.2f}% top-5 {numbers["top5"]:.2f}%'
