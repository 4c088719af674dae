"""A detection run scored as COCO scores it: every image of each eval split through the jitted
inference, its detections mapped back to the image's own pixels (boxes scaled, masks pasted at
full size), then box and mask AP by pycocotools; inference ms per image beside them. Also what
`eval.py` runs on a detection workdir."""

import datetime
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import ml_collections
import numpy as np

from halonet import console
from halonet import sharding
from halonet import text_table
from halonet.detection import checks
from halonet.detection import coco_eval
from halonet.detection import data as data_lib
from halonet.detection import train_step as step_lib
from halonet.models import networks
from halonet.train import checkpointing
from halonet.train import event_writer
from halonet.train import optim
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib

EVENTS_FOLDER = 'eval'  # As classification's: eval.py's scalars are TensorBoard's run 'eval'.


def _gathered(values: np.ndarray) -> np.ndarray:
  """Every process's rows, in process order (this process's own on one host)."""
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(values, tiled=True))


def evaluate_split(
  infer: Any,
  state: train_step_lib.TrainState,
  config: ml_collections.ConfigDict,
  images: data_lib.Source,
  mesh: Mesh,
) -> dict[str, Any]:
  """{'bbox': {AP, AP50, AP75, APs, APm, APl}, 'segm': {...}, 'ms_per_image', 'count'} of
  `images` (percent; -100 where the split has no object of a size)."""
  truth = images.truth()
  shapes = {image['id']: (image['height'], image['width']) for image in truth['images']}
  found, seconds, count = [], 0.0, 0
  for batch in data_lib.eval_batches(
    config, images, process_index=jax.process_index(), process_count=jax.process_count()
  ):
    inputs = sharding.shard_batch({k: batch[k] for k in step_lib.INFER_BATCH_KEYS}, mesh)
    start = time.perf_counter()
    out = jax.block_until_ready(infer(state.params, state.batch_stats, inputs))
    seconds += time.perf_counter() - start
    out = jax.device_get(out)
    real, ids, scales = (_gathered(batch[k]) for k in ('real', 'image_id', 'scale'))
    for i in np.flatnonzero(real):
      kept = out['valid'][i]
      boxes = out['boxes'][i][kept] / np.tile(scales[i], 2)
      height, width = shapes[int(ids[i])]
      masks = coco_eval.paste_masks(out['masks'][i][kept], boxes, height, width)
      categories = np.asarray(images.category_ids)[out['classes'][i][kept] - 1]
      found += coco_eval.results(int(ids[i]), boxes, out['scores'][i][kept], categories, masks)
      count += 1
  scores = coco_eval.evaluate(truth, found)
  return {**scores, 'ms_per_image': 1000.0 * seconds / max(count, 1), 'count': count}


def evaluate_all(
  infer: Any, state: train_step_lib.TrainState, config: ml_collections.ConfigDict, mesh: Mesh
) -> dict[str, dict[str, Any]]:
  """evaluate_split of each of config.input.eval_splits, by split."""
  return {
    split: evaluate_split(
      infer,
      state,
      config,
      data_lib.source(config, split, train=False),
      mesh,
    )
    for split in config.input.eval_splits
  }


def scalars(evals: dict[str, dict[str, Any]]) -> dict[str, float]:
  """TensorBoard's names: 'eval/SPLIT/bbox/AP', ..., 'eval/SPLIT/ms_per_image'."""
  out = {}
  for split, r in evals.items():
    for kind in ('bbox', 'segm'):
      out.update({f'eval/{split}/{kind}/{name}': v for name, v in r[kind].items()})
    out[f'eval/{split}/ms_per_image'] = r['ms_per_image']
  return out


def table(evals: dict[str, dict[str, Any]]) -> str:
  """The paper's detection table's columns: box AP (all, small, medium, large), mask AP, ms."""
  rows = []
  for split, r in evals.items():
    row = {'split': split}
    for kind, tag in (('bbox', 'bb'), ('segm', 'mk')):
      row.update({f'{name}^{tag}': f'{r[kind][name]:.1f}' for name in coco_eval.NUMBERS})
    rows.append({**row, 'ms/image': f'{r["ms_per_image"]:.1f}', 'images': str(r['count'])})
  return text_table.format_table(rows)


def records(
  evals: dict[str, dict[str, Any]], config: ml_collections.ConfigDict, step: int
) -> list[dict[str, Any]]:
  """One eval_records.jsonl line per split."""
  when = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
  return [
    {
      'step': step,
      'task': 'detection',
      'dataset': config.input.dataset,
      'split': split,
      'image_size': config.image_size,
      'evaluated_at': when,
      **r,
    }
    for split, r in evals.items()
  ]


def detector_of(config: ml_collections.ConfigDict) -> step_lib.Detector:
  """The backbone config.model builds and config.detection's heads, in the backbone's dtype."""
  backbone = networks.build_model(config)
  return step_lib.Detector(backbone, step_lib.heads_of(config, backbone.dtype))


def compile_infer(
  config: ml_collections.ConfigDict,
  detector: step_lib.Detector,
  mesh: Mesh,
  abstract: train_step_lib.TrainState,
) -> tuple[Any, float]:
  """Inference for a global batch of config.eval_batch_size, compiled now; and the seconds it
  took."""
  size, batch = config.image_size, config.eval_batch_size
  specs = {
    'image': jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8),
    'image_size': jax.ShapeDtypeStruct((batch, 2), np.int32),
  }
  start = time.perf_counter()
  compiled = (
    step_lib.make_infer(config, detector, mesh)
    .lower(abstract.params, abstract.batch_stats, specs)
    .compile()
  )
  return compiled, time.perf_counter() - start


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, Any]:
  """Scores a saved step (default: the newest that reads whole) on config.input.eval_splits,
  prints the table and appends one record per split to workdir/eval_records.jsonl."""
  checks.validate_config(config)
  workdir_lib.check_same_model(config, workdir)
  for split in config.input.eval_splits:  # A missing split is named before anything compiles.
    data_lib.source(config, split, train=False)
  mesh = sharding.create_mesh(config.mesh_shape)
  detector = detector_of(config)
  tx = optim.create_optimizer(config, lambda _: 0.0)
  _, abstract = step_lib.abstract_state(config, detector, tx, mesh)
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints, read_only=True)
  try:
    _, state = checkpointing.restore_readable(manager, abstract, step, say=console.say)
  finally:
    manager.close()
  infer, _ = compile_infer(config, detector, mesh, abstract)
  with jax.set_mesh(mesh):
    evals = evaluate_all(infer, state, config, mesh)
  step = int(state.step)
  console.say(f'step {step}:\n{table(evals)}')
  workdir_lib.append_eval_records(workdir, records(evals, config, step))
  writer = event_writer.create(
    workdir_lib.file(workdir, EVENTS_FOLDER), just_logging=jax.process_index() > 0
  )
  try:
    writer.write_scalars(step, scalars(evals))
  finally:
    writer.close()
  return {'step': step, 'eval': evals}
