"""Fine-tuning (config.init_from, config.trainable): what carries over, what is refused, and
that the source run is never written to."""

import os

from flax import traverse_util
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from halonet import errors
from halonet import sharding
from halonet.models import networks
from halonet.train import checkpointing
from halonet.train import finetune
from halonet.train import loop as train_lib
from halonet.train import optim
from halonet.train import workdir as workdir_lib
from tests import steps


def _params(**overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  return networks.abstract_variables(config)['params']


def test_only_a_classifier_of_another_shape_is_reinitialised():
  assert finetune.reinitialised(_params(), _params(image_size=48)) == {}  # No size-bound params.
  assert finetune.reinitialised(_params(num_classes=4), _params(num_classes=6)) == {
    'head/bias': ((6,), (4,)),
    'head/kernel': ((32, 6), (32, 4)),
  }


@pytest.mark.parametrize(
  'overrides, named',
  [
    (
      {'model.widths': (8, 16, 16, 48)},
      r'stage4_block0/.* has shape \(.*32.*\) in the source '
      r'run but \(.*48.*\) in the new model',
    ),
    # 2(b + h) - 1 relative offsets: 9 for b = 4, h = 1; 5 for b = 2.
    ({'model.block_size': 2}, r'relative_height has shape \(9, 4\) in the source run but \(5, 4\)'),
    ({'model.final_width': 16}, r'final_(bn|conv)/\w+ exists only in the new model'),
  ],
)
def test_any_other_difference_is_refused_naming_the_parameter(overrides, named):
  with pytest.raises(errors.ConfigError, match=named):
    finetune.reinitialised(_params(**overrides), _params())


def test_head_only_training_moves_the_classifier_and_nothing_else():
  config = tiny.get_config()
  config.trainable = 'head'
  params = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), _params())
  tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, update in traverse_util.flatten_dict(updates, sep='/').items():
    moved = bool(np.any(np.asarray(update) != 0))
    assert moved == name.startswith('head/'), name


def _config(dataset, num_classes, image_size, **overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(
    {
      'input.dataset': dataset,
      'num_classes': num_classes,
      'image_size': image_size,
      'num_train_steps': 2,
      'eval_every_steps': 1000,
      **overrides,
    }
  )
  return config


def _perturbed(tree, rng):
  """Every floating array moved by a distinct random amount, so no value is a fresh one."""
  return jax.tree.map(
    lambda a: (
      np.asarray(a) + rng.normal(1.0, 0.5, np.shape(a)).astype(np.asarray(a).dtype)
      if np.issubdtype(np.asarray(a).dtype, np.floating)
      else np.asarray(a) + 3
    ),
    tree,
  )


def test_the_whole_state_a_fine_tune_starts_from(tmp_path, capsys):
  """Every part of a fine-tune's first state against the source state saved here: parameters
  but the re-shaped classifier and all BatchNorm statistics are the source's; the classifier,
  the optimizer state (not the source's momentum) and the step are the fresh run's; an EMA
  starts at the new parameters."""
  mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
  source_dir, target_dir = tmp_path / 'source', tmp_path / 'target'
  source_config = _config('digits/0-5', 6, 32)
  fresh_source, _ = steps.fresh_state_and_step(source_config, mesh)
  rng = np.random.default_rng(0)
  saved = jax.device_get(fresh_source).replace(step=np.asarray(7, np.int32))
  saved = saved.replace(
    params=_perturbed(saved.params, rng),
    batch_stats=_perturbed(saved.batch_stats, rng),
    opt_state=_perturbed(saved.opt_state, rng),
  )
  manager = checkpointing.create_manager(str(source_dir), 3)
  on_device = fresh_source.params['head']['bias'].sharding
  checkpointing.save(manager, 7, jax.device_put(saved, on_device))
  checkpointing.finish(manager)
  workdir_lib.check_and_store_config(source_config, str(source_dir), False, 0)

  config = _config('digits/6-9', 4, 48, init_from=str(source_dir), ema_decay=0.9)
  fresh, _ = steps.fresh_state_and_step(config, mesh)
  source = finetune.source_run(config, str(target_dir))
  changed = finetune.reinitialised(fresh.params, networks.abstract_variables(source[2])['params'])
  start = jax.device_get(finetune.start_state(fresh, mesh, *source, changed))
  fresh = jax.device_get(fresh)

  said = capsys.readouterr().out
  assert f'initialised from {source_dir} step 7; re-initialised head/bias' in said
  got = traverse_util.flatten_dict(start.params, sep='/')
  want = traverse_util.flatten_dict(saved.params, sep='/')
  new = traverse_util.flatten_dict(fresh.params, sep='/')
  assert sorted(got) == sorted(new)
  for name, value in got.items():
    np.testing.assert_array_equal(value, new[name] if name.startswith('head/') else want[name])
  jax.tree.map(np.testing.assert_array_equal, start.batch_stats, saved.batch_stats)
  jax.tree.map(np.testing.assert_array_equal, start.opt_state, fresh.opt_state)
  assert int(start.step) == 0
  jax.tree.map(np.testing.assert_array_equal, start.ema_params, start.params)


def _files(root):
  return {
    os.path.join(d, f): (
      os.stat(os.path.join(d, f)).st_mtime_ns,
      os.stat(os.path.join(d, f)).st_size,
    )
    for d, _, fs in os.walk(root)
    for f in fs
  }


def _latest(workdir):
  manager = checkpointing.create_manager(str(workdir), 3, read_only=True)
  state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  manager.close()
  return state


@pytest.mark.slow
def test_fine_tune_at_a_new_size_on_new_classes(tmp_path, capsys):
  """Pre-train at 32 px on the digits 0-5, fine-tune the head alone at 48 px on 6-9: every frozen
  parameter equals the source's bit for bit, the classifier is new, the source is untouched, and
  a rerun resumes the fine-tune's own checkpoints."""
  source, target = tmp_path / 'digits0-5', tmp_path / 'digits6-9'
  train_lib.train_and_evaluate(_config('digits/0-5', 6, 32), str(source))
  before = _files(source)
  capsys.readouterr()

  # A checkpoint path (WORKDIR/checkpoints/STEP) names the run and the step.
  config = _config(
    'digits/6-9', 4, 48, init_from=str(source / 'checkpoints' / '2'), trainable='head'
  )
  train_lib.train_and_evaluate(config, str(target))
  out = capsys.readouterr().out
  assert (
    f'initialised from {source} step 2; re-initialised head/bias (6,)->(4,), '
    'head/kernel (32, 6)->(32, 4)'
  ) in out
  assert _files(source) == before

  pretrained, tuned = (
    traverse_util.flatten_dict(_latest(w)['params'], sep='/') for w in (source, target)
  )
  assert tuned['head/kernel'].shape == (32, 4)
  for name, value in tuned.items():
    if not name.startswith('head/'):
      np.testing.assert_array_equal(value, pretrained[name], err_msg=name)

  config.num_train_steps = 3  # Longer: resumes at step 2 of its own run, not from the source.
  train_lib.train_and_evaluate(config, str(target))
  out = capsys.readouterr().out
  assert 'resumed from checkpoint at step 2' in out and 'initialised from' not in out
  assert _files(source) == before


def _no_compile(*args, **kwargs):
  raise AssertionError('compiled before the source was checked')


def test_bad_sources_fail_naming_the_path_before_anything_compiles(tmp_path, monkeypatch):
  missing = tmp_path / 'nowhere'
  config = _config('digits', 10, 32, init_from=str(missing))
  monkeypatch.setattr(jax, 'jit', _no_compile)
  with pytest.raises(FileNotFoundError, match=f"init_from='{missing}': no such directory"):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  (tmp_path / 'empty').mkdir()
  config.init_from = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='is not a train.py workdir'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  (tmp_path / 'empty' / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=r'no complete checkpoint in .*empty \(have \[\]\)'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  (tmp_path / 'run').mkdir(exist_ok=True)
  (tmp_path / 'run' / 'config.json').write_text('{}')
  config.init_from = str(tmp_path / 'run')
  with pytest.raises(errors.ConfigError, match="this run's own workdir"):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))


def test_a_source_of_another_architecture_is_refused_naming_each_sides_shape(tmp_path, monkeypatch):
  """Through the run's set-up, before anything compiles: the parameter that differs, with the
  source run's shape and the new model's, each on its side."""
  source = _source_workdir(tmp_path / 'source')  # tiny.py's widths, (8, 16, 16, 32).
  config = _config('digits/6-9', 4, 48, init_from=str(source), **{'model.widths': (8, 16, 16, 48)})

  monkeypatch.setattr(jax, 'jit', _no_compile)
  with pytest.raises(
    errors.ConfigError,
    match=r'stage4_block0/.* has shape \(.*32.*\) in the source run but \(.*48.*\) in the new',
  ):
    train_lib.train_and_evaluate(config, str(tmp_path / 'new'))


def _source_workdir(source):
  """A workdir as train.py leaves it, by hand: its config.json and checkpoints of steps 2 and 4."""
  config = _config('digits/0-5', 6, 32)
  workdir_lib.check_and_store_config(config, str(source), allow_change=False, step=0)
  manager = checkpointing.create_manager(str(source), 3)
  for step in (2, 4):
    checkpointing.save(manager, step, {'params': {'w': np.full(3, step, np.float32)}})
  checkpointing.finish(manager)
  return source


@pytest.fixture
def source_workdir(tmp_path):
  return _source_workdir(tmp_path / 'source')


@pytest.mark.parametrize('where, step', [('', None), ('checkpoints/2', 2), ('checkpoints/4', 4)])
def test_source_is_a_workdir_or_one_of_its_checkpoints(source_workdir, tmp_path, where, step):
  config = _config('digits/6-9', 4, 48, init_from=str(source_workdir / where))
  source, got_step, source_config = finetune.source_run(config, str(tmp_path / 'new'))
  assert (source, got_step) == (str(source_workdir), step)
  assert (source_config.input.dataset, source_config.num_classes) == ('digits/0-5', 6)


@pytest.mark.parametrize('name', ['2024', 'checkpoints/run'])
def test_a_workdir_named_like_a_step_is_still_a_workdir(tmp_path, name):
  """Only a number under a `checkpoints` folder names a step."""
  source = _source_workdir(tmp_path / name)
  config = _config('digits/6-9', 4, 48, init_from=str(source))
  assert finetune.source_run(config, str(tmp_path / 'new'))[:2] == (str(source), None)


def test_a_missing_step_or_own_workdir_is_refused_naming_it(source_workdir, tmp_path):
  config = _config('digits/6-9', 4, 48, init_from=str(source_workdir / 'checkpoints' / '3'))
  with pytest.raises(FileNotFoundError, match='no such directory'):
    finetune.source_run(config, str(tmp_path / 'new'))
  config.init_from = str(source_workdir)
  with pytest.raises(errors.ConfigError, match="this run's own workdir"):
    finetune.source_run(config, str(source_workdir))


def test_start_takes_every_source_parameter_but_the_changed_ones():
  fresh = {'head': {'kernel': np.zeros((2, 4)), 'bias': np.zeros(4)}, 'stem': {'w': np.zeros(3)}}
  source = {'head': {'kernel': np.ones((2, 6)), 'bias': np.ones(4)}, 'stem': {'w': np.ones(3)}}
  got = finetune.start_from(fresh, source, {'head/kernel': ((2, 6), (2, 4))})
  np.testing.assert_array_equal(got['head']['kernel'], np.zeros((2, 4)))
  np.testing.assert_array_equal(got['head']['bias'], np.ones(4))
  np.testing.assert_array_equal(got['stem']['w'], np.ones(3))
