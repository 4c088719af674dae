"""Fine-tuning: a new run starts from another run's parameters (config.init_from).

The paper pre-trains on ImageNet-21k and fine-tunes on ImageNet at a larger size (section 3.7).
Here a run may start from any run's checkpoint and change the dataset, `num_classes`,
`image_size`, the optimizer and the schedule: halo attention's parameters (projections and
relative-position tables of b and h) do not depend on the map size, so every parameter except the
classifier carries over. The classifier is re-initialised when its shape changes; any other
shape change (widths, b, h, depths) is refused, naming the parameter and both shapes. The
optimizer state and the step start fresh; BatchNorm statistics carry over. The source run is
only read. Once the new run has a checkpoint of its own, a rerun resumes from that instead.
"""

from typing import Any

from flax import traverse_util
from jax.sharding import Mesh
import ml_collections

from halonet import console
from halonet import errors
from halonet import paths
from halonet.models import halonet as model_lib
from halonet.train import checkpointing
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib


def source_run(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[str, int | None, ml_collections.ConfigDict]:
  """(workdir, step or None for its latest, config) of config.init_from: a workdir, or one of its
  checkpoints (WORKDIR/checkpoints/STEP). Fails in one line naming the path."""
  path = paths.path(paths.as_string(config.init_from))
  source, step = path, None
  if path.name.isdigit() and path.parent.name == 'checkpoints':
    source, step = path.parent.parent, int(path.name)
  if not path.is_dir():
    raise FileNotFoundError(f'config.init_from={config.init_from!r}: no such directory')
  if not (source / workdir_lib.CONFIG).exists():
    raise FileNotFoundError(
      f'config.init_from={config.init_from!r}: {source} is not a train.py workdir (no config.json)'
    )
  source = str(source)
  if paths.same_location(source, workdir):
    raise errors.ConfigError(
      f"config.init_from={config.init_from!r} is this run's own workdir: "
      'fine-tune into a new one (a rerun resumes by itself)'
    )
  manager = checkpointing.create_manager(source, 1, read_only=True)
  steps = sorted(manager.all_steps())
  manager.close()
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(
      f'config.init_from={config.init_from!r}: no complete checkpoint '
      f'{"" if step is None else f"for step {step} "}in {source} '
      f'(have {steps})'
    )
  return source, step, workdir_lib.load_config(source)


def reinitialised(params: Any, source_params: Any) -> dict[str, tuple[tuple, tuple]]:
  """{parameter: (source shape, new shape)} of the classifier parameters whose shape changed.

  Takes abstract or concrete trees. Raises ConfigError for any other difference.
  """
  new, old = (traverse_util.flatten_dict(p, sep='/') for p in (params, source_params))
  for name in sorted(new.keys() ^ old.keys()):
    where = 'the new model' if name in new else 'the source run'
    raise errors.ConfigError(
      f'config.init_from: parameter {name} exists only in {where}; the '
      'two models differ in more than the classifier'
    )
  changed = {
    name: (tuple(old[name].shape), tuple(new[name].shape))
    for name in sorted(new)
    if new[name].shape != old[name].shape
  }
  for name, (was, now) in changed.items():
    if not name.startswith(model_lib.CLASSIFIER + '/'):
      raise errors.ConfigError(
        f'config.init_from: parameter {name} has shape {was} in the '
        f'source run but {now} in the new model'
      )
  return changed


def start_from(params: Any, source_params: Any, changed: dict[str, Any]) -> Any:
  """The new run's params: the source's, except the `changed` parameters, which keep their
  fresh initialisation."""
  new, old = (traverse_util.flatten_dict(p, sep='/') for p in (params, source_params))
  merged = {name: new[name] if name in changed else old[name] for name in new}
  return traverse_util.unflatten_dict(merged, sep='/')


def start_state(
  state: train_step_lib.TrainState,
  mesh: Mesh,
  source_dir: str,
  source_step: int | None,
  source_config: ml_collections.ConfigDict,
  changed: dict[str, tuple[tuple, tuple]],
) -> train_step_lib.TrainState:
  """The fresh `state` with the source run's parameters (but the `changed` ones) and BatchNorm
  statistics; the optimizer state (zeros and a zero count for SGD and AdamW) and the step stay as
  initialised, and an EMA starts at the new parameters."""
  source, _, _ = train_step_lib.restore_run(source_config, source_dir, mesh, source_step)
  params = start_from(state.params, source.params, changed)
  fresh = ', '.join(f'{name} {was}->{now}' for name, (was, now) in changed.items())
  console.say(
    f'initialised from {source_dir} step {int(source.step)}'
    + (f'; re-initialised {fresh}' if fresh else '')
  )
  # The classifier has no BatchNorm statistics: all of the source's carry over.
  return state.replace(
    params=params,
    batch_stats=source.batch_stats,
    ema_params=params if state.ema_params is not None else None,
  )
