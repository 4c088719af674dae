"""The files a run keeps beside its checkpoints: config.json, results.json, eval_records.jsonl.

All of them go through halonet/paths.py, so a workdir may be a local folder or a bucket URL.
"""

import json
from typing import Any

from flax import traverse_util
import ml_collections

from halonet import defaults
from halonet import errors
from halonet import paths

CONFIG = 'config.json'
RESULTS = 'results.json'
EVAL_RECORDS = 'eval_records.jsonl'

# What a resumed run may change: how it is run and observed, and how long it trains (the
# learning-rate schedule then follows the new length from the resumed step on). Any other
# change would make the resumed run a different experiment, and is refused unless allowed.
RESUMABLE_FIELDS = (
  'log_every_steps',
  'eval_every_steps',
  'checkpoint_every_steps',
  'keep_checkpoints',
  'input.eval_splits',
  'evals',
  'fewshot_shots',
  'fewshot_seeds',
  'fewshot_l2',
  'eval_batch_size',
  'mesh_shape',
  'input.data_dir',
  'input.manual_dir',
  'input.cache',
  'num_epochs',
  'num_train_steps',
  'profile_steps',
  'storage_outage_minutes',
)
# What a checkpoint's arrays depend on: evaluating it with other values here cannot work.
CHECKPOINT_FIELDS = ('model', 'num_classes')


def file(workdir: paths.PathLike, name: str) -> str:
  """The path of `name` in `workdir`, as a string a user can read (a URL stays one)."""
  return str(paths.path(workdir) / name)


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Dotted names of the fields whose values differ between two configs (as JSON dicts). A field
  one of them lacks (added to the configs since it was stored) counts as its default, as
  `load_config` reads it."""
  default = traverse_util.flatten_dict(as_json(defaults.base_config()), sep='.')
  old_flat, new_flat = ({**default, **traverse_util.flatten_dict(c, sep='.')} for c in (old, new))
  return sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))


def _within(field: str, groups: tuple[str, ...]) -> bool:
  """Whether dotted `field` is one of `groups` or inside one of them."""
  return any(field == g or field.startswith(f'{g}.') for g in groups)


def refused_on_resume(fields: list[str]) -> list[str]:
  return [f for f in fields if not _within(f, RESUMABLE_FIELDS)]


def refused_for_eval(fields: list[str]) -> list[str]:
  return [f for f in fields if _within(f, CHECKPOINT_FIELDS)]


def check_same_model(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> None:
  """Refuses, in one line, a config whose model differs from the one workdir's checkpoints were
  trained with (CHECKPOINT_FIELDS); a workdir without config.json is not checked."""
  stored = stored_config(workdir)
  if stored is None:
    return
  diff = refused_for_eval(changed_fields(stored, as_json(config)))
  if diff:
    raise errors.ConfigError(
      f'the checkpoints in {workdir} were trained with a different model (fields: '
      f'{", ".join(diff)})'
    )


def stored_config(workdir: paths.PathLike) -> dict[str, Any] | None:
  """The run's config.json as a dict, or None before its first start; a run stored before the
  input fields moved into config.input reads them there (defaults.MOVED_FIELDS)."""
  target = paths.path(workdir) / CONFIG
  if not target.exists():
    return None
  try:
    stored = paths.read_json(target)
  except ValueError as e:  # json's decode error: a file cut short or overwritten.
    raise errors.ConfigError(
      f'{paths.as_string(target)} cannot be read ({e}): restore it (config.step*.json hold '
      'earlier versions) or move it aside to start the run anew'
    ) from None
  moved = {old: stored.pop(old) for old in defaults.MOVED_FIELDS if old in stored}
  if moved:
    stored['input'] = {**stored.get('input', {}), **moved}
  return stored


def load_config(workdir: paths.PathLike) -> ml_collections.ConfigDict:
  """The run's config.json as a config: fields added since the run keep their defaults."""
  stored = stored_config(workdir)
  if stored is None:
    raise FileNotFoundError(
      f'no {file(workdir, CONFIG)}: pass --config, or a workdir that train.py wrote'
    )
  config = defaults.base_config()
  # JSON turned the config's tuples into lists.
  config.update_from_flattened_dict(
    {
      k: tuple(v) if isinstance(v, list) else v
      for k, v in traverse_util.flatten_dict(stored, sep='.').items()
    }
  )
  return config


def check_and_store_config(
  config: ml_collections.ConfigDict, workdir: paths.PathLike, allow_change: bool, step: int
) -> None:
  """Records the config on first start; on restart refuses a changed one unless allowed.

  A changed config (one RESUMABLE_FIELDS allows, or any when allowed) replaces config.json; the
  old one is first written to config.step<step>.json (.1, .2, ... on further restarts at that
  step), so no history is lost, on an object store too.
  """
  new = as_json(config)
  old = stored_config(workdir)
  if old is not None:
    changes = changed_fields(old, new)
    if not changes:
      return
    refused = refused_on_resume(changes)
    if refused and not allow_change:
      raise errors.ConfigError(
        f'{file(workdir, CONFIG)} was written by a different config (fields: '
        f'{", ".join(refused)}); pass --allow_config_change to resume anyway'
      )
    paths.write_json(paths.unused_path(file(workdir, f'config.step{step}.json')), old)
  paths.write_json(file(workdir, CONFIG), new)


def read_results(workdir: paths.PathLike) -> dict[str, Any]:
  """results.json, or {} before the run's first evaluation."""
  target = paths.path(workdir) / RESULTS
  return paths.read_json(target) if target.exists() else {}


def write_results(workdir: paths.PathLike, results: dict[str, Any]) -> None:
  paths.write_json(file(workdir, RESULTS), results)


def append_eval_records(workdir: paths.PathLike, records: list[dict[str, Any]]) -> None:
  paths.append_json_lines(file(workdir, EVAL_RECORDS), records)
