"""timm's trained halo networks as runs of this project:

    python convert.py --model=halonet50ts --weights=PATH/model.safetensors --workdir=W

reads timm's weights (safetensors, with numpy: no torch) into `byob.ByobNet`, and writes an Orbax
checkpoint and config.json into W, so `eval.py --workdir=W`, `predict.py --workdir=W`,
`trained.load(W)`, `visualize.py --workdir=W` and `--config.init_from=W` take it like any
run. The config carries the model's preprocessing from timm's pretrained_cfg (input size, crop
fraction, mean and std; all of them resize bicubically, as the input pipeline does).
`--weights` may also be a Hugging Face cache folder holding one model.safetensors (nothing is
downloaded).
"""

import difflib
import math
import sys
from typing import Any, NamedTuple

from absl import app
from absl import flags

from halonet.models import networks
from halonet.train import launch  # First: quiets TensorFlow.

# isort: split

from flax import traverse_util
import ml_collections
import numpy as np

from halonet import defaults
from halonet import errors
from halonet import paths
from halonet.models.timm import byob


class Pretrained(NamedTuple):
  """timm's pretrained_cfg of a model, and its ImageNet-1k top-1 at that size (timm's
  results-imagenet.csv) for the README's table; None: no trained weights (halonet_h1)."""

  image_size: int
  crop_fraction: float
  top1: float | None
  # Where timm's differ from the config's default (ImageNet's); None: that default.
  mean: tuple[float, float, float] | None = None
  std: tuple[float, float, float] | None = None


PRETRAINED = {
  'halonet_h1': Pretrained(256, 0.95, None),
  'halonet26t': Pretrained(256, 0.95, 79.13),
  'sehalonet33ts': Pretrained(256, 0.94, 80.98),
  'halonet50ts': Pretrained(256, 0.94, 81.64),
  'eca_halonext26ts': Pretrained(256, 0.94, 79.52),
  'haloregnetz_b': Pretrained(224, 0.94, 81.06, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
  'lamhalobotnet50ts_256': Pretrained(256, 0.95, 81.55),
  'halo2botnet50ts_256': Pretrained(256, 0.95, 82.08),
}


def model_config(name: str) -> ml_collections.ConfigDict:
  """The config of timm's `name` as a run of this project: ImageNet at its pretrained size."""
  if name not in byob.ARCHS:
    close = difflib.get_close_matches(name, list(byob.ARCHS), n=3, cutoff=0.5)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    raise errors.ConfigError(f'--model={name!r} is not one of {sorted(byob.ARCHS)}{hint}')
  pretrained = PRETRAINED[name]
  config = defaults.base_config()
  config.variant = name
  config.model.arch = name
  config.image_size = pretrained.image_size
  config.input.crop_fraction = pretrained.crop_fraction
  if pretrained.mean:
    config.input.pixel_mean, config.input.pixel_std = pretrained.mean, pretrained.std
  return config


def _torch_name(path: tuple[str, ...]) -> tuple[str, str]:
  """(timm state-dict prefix, last part) of a Flax variable path, e.g. ('stage2_block0',
  'self_attn', 'query', 'kernel') -> ('stages.1.0.self_attn.q', 'weight')."""
  *modules, leaf = path
  names = []
  for module in modules:
    if module.startswith('stem_conv'):
      names += ['stem', f'conv{module[len("stem_conv") :]}']
    elif module.startswith('stage'):
      stage, block = module[len('stage') :].split('_block')
      names += ['stages', str(int(stage) - 1), block]
    else:
      names.append({'query': 'q', 'key_value': 'kv', 'head': 'head.fc'}.get(module, module))
  if leaf in ('relative_height', 'relative_width'):
    names.append('pos_embed')
    leaf = {'relative_height': 'height_rel', 'relative_width': 'width_rel'}[leaf]
  elif names[-1] == 'attn' and leaf == 'kernel' and len(path) == 3:  # ECA's 1-D conv.
    names.append('conv')
  leaf = {
    'kernel': 'weight',
    'scale': 'weight',
    'bias': 'bias',
    'mean': 'running_mean',
    'var': 'running_var',
  }.get(leaf, leaf)
  return '.'.join(names), leaf


def _to_flax(value: np.ndarray, target_shape: tuple[int, ...], path: tuple[str, ...]) -> np.ndarray:
  """One timm tensor in the layout of the Flax variable at `path` (conv OIHW -> HWIO, linear and
  1x1 projections [out, in] -> [in, out], head projections split per head)."""
  leaf = path[-1]
  if leaf == 'kernel':
    if value.ndim == 5:  # The lambda layer's Conv3d(1, k, (r, r, 1)): [k, 1, r, r, 1] -> HWIO.
      value = value[..., 0].transpose(2, 3, 1, 0)
    elif value.ndim == 4 and len(target_shape) == 4:  # Conv: OIHW -> HWIO.
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 4:  # A 1x1 conv as a projection: [out, in, 1, 1] -> [in, out].
      value = value[:, :, 0, 0].T
    elif value.ndim == 3:  # ECA's Conv1d(1, 1, k): [1, 1, k] -> [k, 1, 1].
      value = value.reshape(-1, 1, 1)
    else:  # Linear.
      value = value.T
    if len(target_shape) == 3 and value.ndim == 2:  # HeadProjection [in, heads, width].
      if value.shape[1] != math.prod(target_shape[1:]):
        return value  # Left for the shape check to name.
      value = value.reshape(target_shape)
  return value


def _network_order(key: str) -> tuple:
  """Sorts timm keys stem, stages (by number), final conv, head: errors name the earliest."""
  parts = key.split('.')
  rank = {'stem': 0, 'stages': 1, 'final_conv': 2, 'head': 3}.get(parts[0], 4)
  return (rank, *[(int(p), '') if p.isdigit() else (-1, p) for p in parts[1:]])


def _split_qkv(state: dict[str, np.ndarray], planned: dict) -> dict[str, np.ndarray]:
  """BoTNet's layers (timm's BottleneckAttn) project q, k and v with one conv, all heads' q,
  then all k, then all v: rewritten as the q and per-head interleaved kv convs of HaloAttn."""
  shapes = {key: shape for key, shape in planned.values()}
  state = dict(state)
  for key in [k for k in state if k.endswith('.self_attn.qkv.weight')]:
    prefix = key[: -len('qkv.weight')]
    if prefix + 'q.weight' not in shapes:  # A lambda layer's: one conv in timm and here.
      continue
    _, heads, qk = shapes[prefix + 'q.weight']
    value = shapes[prefix + 'kv.weight'][2] - qk
    weight = state.pop(key)
    channels = weight.shape[1:]
    if weight.shape[0] != heads * (2 * qk + value):
      state[key] = weight  # Left unused: named as such.
      continue
    q, k, v = np.split(weight, [heads * qk, 2 * heads * qk])
    state[prefix + 'q.weight'] = q
    state[prefix + 'kv.weight'] = np.concatenate(
      [k.reshape(heads, qk, *channels), v.reshape(heads, value, *channels)], axis=1
    ).reshape(-1, *channels)
  return state


def convert(
  name: str, state: dict[str, np.ndarray], abstract_variables: Any
) -> dict[str, dict[str, Any]]:
  """{'params', 'batch_stats'} of `byob.ByobNet(name)` from timm's state dict `state`.

  Every variable must come from a tensor of its exact shape and every tensor must be used (but
  BatchNorm's num_batches_tracked): otherwise one line names the first that does not fit.
  Position tables are scaled by sqrt(d): timm adds q.r unscaled, the layer adds (q/sqrt(d)).r.
  """
  planned = {}  # (collection, path) -> (timm key, target shape), in the model's order.
  for collection in ('params', 'batch_stats'):
    for path, target in traverse_util.flatten_dict(abstract_variables[collection]).items():
      prefix, leaf = _torch_name(path)
      planned[collection, path] = (f'{prefix}.{leaf}', tuple(target.shape))
  state = _split_qkv(state, planned)
  order = lambda item: _network_order(item[1][0])
  planned = dict(sorted(planned.items(), key=order))
  converted = {}
  # A tensor of the wrong shape says more about a wrong file than a missing one: named first.
  for (collection, path), (key, shape) in planned.items():
    if key not in state:
      continue
    value = _to_flax(np.asarray(state[key], np.float32), shape, path)
    if value.shape != shape:
      raise errors.ConfigError(
        f"{key} {tuple(state[key].shape)} converts to {value.shape}, but {name}'s "
        f'{"/".join(path)} is {shape}: these weights are not those of {name}'
      )
    if path[-1] in ('relative_height', 'relative_width'):
      value = value * math.sqrt(value.shape[-1])
    converted[collection, path] = value
  for (_, path), (key, shape) in planned.items():
    if key not in state:
      raise errors.ConfigError(
        f'the weights have no {key} for {"/".join(path)} {shape}: they are not those of {name}'
      )
  variables = {
    collection: traverse_util.unflatten_dict(
      {path: value for (c, path), value in converted.items() if c == collection}
    )
    for collection in ('params', 'batch_stats')
  }
  used = {key for key, _ in planned.values()}
  unused = sorted(k for k in state if k not in used and not k.endswith('num_batches_tracked'))
  if unused:
    raise errors.ConfigError(
      f'{len(unused)} tensors of the weights have no place in {name}, e.g. {unused[0]} '
      f'{tuple(state[unused[0]].shape)}: they are not those of {name}'
    )
  return variables


def weights_file(path: str) -> str:
  """`path` itself, or the one model.safetensors under a (Hugging Face cache) folder."""
  if not paths.path(path).is_dir():
    return path
  found = [f for f in paths.files_under(path) if f.endswith('model.safetensors')]
  if len(found) != 1:
    raise errors.ConfigError(
      f'--weights={path} is a folder with {len(found)} model.safetensors files; name one'
    )
  return found[0]


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file's tensors as numpy arrays (read through the path layer)."""
  from safetensors.numpy import load  # pylint: disable=g-import-not-at-top  # Conversion only.

  try:
    return load(paths.path(path).read_bytes())
  except FileNotFoundError:
    raise errors.ConfigError(f'--weights={path}: no such file') from None
  except Exception as e:  # safetensors raises its own error type for a file of another format.
    raise errors.ConfigError(f'--weights={path} is not a safetensors file: {e}') from None


def write_run(name: str, weights: str, workdir: str) -> str:
  """Converts `weights` of timm's `name` into a new run in `workdir`; returns what it wrote."""
  import jax  # pylint: disable=g-import-not-at-top

  from halonet import sharding  # pylint: disable=g-import-not-at-top
  from halonet.train import checkpointing  # pylint: disable=g-import-not-at-top
  from halonet.train import step as train_step_lib  # pylint: disable=g-import-not-at-top
  from halonet.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  config = model_config(name)
  if workdir_lib.stored_config(workdir) is not None:
    raise errors.ConfigError(f'--workdir={workdir} already holds a run; convert into a new one')
  # The weights are read and converted first: a bad file leaves no workdir behind.
  state = read_safetensors(weights_file(weights))
  variables = convert(name, state, networks.abstract_variables(config))
  paths.check_writable(workdir, 'workdir')
  mesh = sharding.create_mesh((-1, 1))
  model, tx, _, _ = train_step_lib.build(config, 1)
  init, _ = train_step_lib.abstract_train_state(config, model, tx, mesh)
  fresh = jax.jit(init)(jax.random.key(config.seed))
  run_state = fresh.replace(
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    ema_params=variables['params'] if fresh.ema_params is not None else None,
  )
  workdir_lib.check_and_store_config(config, workdir, False, 0)
  manager = checkpointing.create_manager(workdir, config.keep_checkpoints)
  checkpointing.save(manager, 0, run_state)
  checkpointing.finish(manager)
  return f'{name}: {networks.count_params(config):,} parameters from {weights} -> {workdir}'


def define_flags() -> None:
  """The command's flags, defined only when it runs: modules that the library and other
  commands import must not claim flag names (--workdir) in absl's global registry."""
  flags.DEFINE_string('model', None, f'One of {sorted(byob.ARCHS)} (timm names).')
  flags.DEFINE_string('weights', None, "timm's model.safetensors, or a folder holding one.")
  flags.DEFINE_string('workdir', None, 'A new workdir for the converted run.')
  flags.mark_flags_as_required(['model', 'weights', 'workdir'])


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  launch.quiet_logs()
  with launch.one_line_errors():
    print(write_run(FLAGS.model, FLAGS.weights, FLAGS.workdir), file=sys.stdout)
