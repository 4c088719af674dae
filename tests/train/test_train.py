"""Train step: same result on any mesh, one compile, learns digits; bad input fails early."""

import functools
import json
import os
import re
import subprocess
import sys

import chex
from flax import traverse_util
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from configs import tiny
from halonet import errors
from halonet import sharding
from halonet.data import pipeline as input_pipeline
from halonet.train import checkpointing
from halonet.train import config_checks
from halonet.train import loop as train_lib
from halonet.train import step as train_step_lib
from halonet.train import workdir as workdir_lib
from tests import inputs
from tests import load
from tests import steps


@functools.cache
def _one_step(mesh_shape, num_devices):
  config = tiny.get_config()
  config.ema_decay = 0.5  # Covers the EMA update as well.
  mesh = sharding.create_mesh(mesh_shape, jax.devices()[:num_devices])
  state, step = steps.fresh_state_and_step(config, mesh)
  state, metrics = step(state, sharding.shard_batch(steps.random_batch(config, 0), mesh))
  return jax.device_get(
    (metrics['loss'], metrics['grad_norm'], state.params, state.batch_stats, state.ema_params)
  )


# (4, 2): image rows split over 2 spatial devices (a 32 px image: padded block rows too).
@pytest.mark.parametrize('mesh_shape', [(8, 1), (4, 2)])
def test_sharded_step_matches_one_device(mesh_shape):
  # Sharded BN statistics and gradients sum in a different order: float32 rounding only.
  chex.assert_trees_all_close(_one_step(mesh_shape, 8), _one_step((1, 1), 1), rtol=1e-5, atol=1e-6)


def test_train_step_compiles_once(monkeypatch):
  monkeypatch.setattr(
    train_step_lib, 'train_step', chex.assert_max_traces(train_step_lib.train_step, n=1)
  )
  config = tiny.get_config()
  mesh = sharding.create_mesh(config.mesh_shape)
  state, step = steps.fresh_state_and_step(config, mesh)
  for seed in range(3):
    state, _ = step(state, sharding.shard_batch(steps.random_batch(config, seed), mesh))
  assert int(state.step) == 3


def test_loss_falls_on_digits():
  config = tiny.get_config()
  config.num_train_steps = 60
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 0.1
  mesh = sharding.create_mesh(config.mesh_shape)
  state, step = steps.fresh_state_and_step(config, mesh)
  # The un-augmented view of the train split: this checks the step learns, not the augmentation.
  batches = inputs.create_split(
    config, config.input.train_split, train=False, batch_size=config.batch_size
  )
  losses = []
  for _, batch in zip(range(config.num_train_steps), batches):
    batch.pop('mask')
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    losses.append(metrics['loss'])
  losses = np.asarray(jax.device_get(losses))
  assert losses[-10:].mean() < losses[:5].mean() - 0.5, losses


def _no_compile(*args, **kwargs):
  raise AssertionError('something was traced or compiled before the input was validated')


@pytest.mark.parametrize(
  'overrides, named',
  [
    ({'batch_size': 12}, 'batch_size=12'),
    ({'eval_batch_size': 20}, 'eval_batch_size=20'),
    ({'mesh_shape': (3, 1)}, 'mesh_shape=(3, 1)'),
    ({'mesh_shape': (2, 2)}, 'mesh_shape=(2, 2)'),
    ({'mesh_shape': (4, 2), 'image_size': 33}, 'image_size=33 does not split into 2'),
    ({'image_size': 16}, 'image_size=16'),
    ({'optimizer.name': 'lamb'}, "'lamb'"),
    ({'ema_decay': 1.5}, 'ema_decay=1.5'),
    ({'input.crop_fraction': 0.0}, 'crop_fraction=0.0'),
    ({'input.crop_area_range': (0.5, 0.2)}, 'crop_area_range=(0.5, 0.2)'),
    (
      {'input.dataset': 'image_folder', 'input.data_dir': '/nonexistent/images'},
      '/nonexistent/images',
    ),
  ],
)
def test_bad_input_fails_in_one_line_before_compile(overrides, named, tmp_path, monkeypatch):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  monkeypatch.setattr(jax, 'jit', _no_compile)
  monkeypatch.setattr(jax, 'eval_shape', _no_compile)
  with pytest.raises((ValueError, FileNotFoundError)) as error:
    train_lib.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert named in str(error.value) and '\n' not in str(error.value)
  assert not (tmp_path / 'workdir').exists()  # A corrected rerun is not refused as a change.


def test_batch_must_split_over_processes():
  with pytest.raises(ValueError, match='batch_size=16 is not divisible by the 3 processes'):
    config_checks.validate_config(tiny.get_config(), num_devices=8, process_count=3)


def test_changed_config_is_refused_then_allowed(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  workdir_lib.check_and_store_config(tiny.get_config(), workdir, allow_change=False, step=0)
  original = (tmp_path / 'config.json').read_text()
  changed = tiny.get_config()
  changed.model.widths = (8, 16, 16, 16)
  changed.optimizer.learning_rate = 0.5
  changed.log_every_steps = 7  # Run control: may change freely.
  monkeypatch.setattr(jax, 'jit', _no_compile)
  with pytest.raises(ValueError) as error:
    train_lib.train_and_evaluate(changed, workdir)
  message = str(error.value)
  assert 'model.widths' in message and 'optimizer.learning_rate' in message
  assert 'log_every_steps' not in message and '\n' not in message
  assert (tmp_path / 'config.json').read_text() == original
  workdir_lib.check_and_store_config(changed, workdir, allow_change=True, step=4)
  assert (tmp_path / 'config.step4.json').read_text() == original
  assert json.loads((tmp_path / 'config.json').read_text())['model']['widths'] == [8, 16, 16, 16]


def test_resume_may_train_longer_and_keeps_every_replaced_config(tmp_path):
  workdir, read = str(tmp_path), lambda name: json.loads((tmp_path / name).read_text())
  workdir_lib.check_and_store_config(tiny.get_config(), workdir, allow_change=False, step=0)
  for total in (8, 12):  # Extended twice, both times resumed at step 4: neither is refused.
    longer = tiny.get_config()
    longer.num_train_steps = total
    workdir_lib.check_and_store_config(longer, workdir, allow_change=False, step=4)
  assert read('config.json')['num_train_steps'] == 12
  assert read('config.step4.json')['num_train_steps'] == 4  # Not overwritten by the second.
  assert read('config.step4.1.json')['num_train_steps'] == 8


def _poison_targets_at(monkeypatch, bad_step):
  """The train stream with NaN targets at `bad_step` (counting from 1)."""
  create_split = input_pipeline.create_split

  def poisoned(data, split, *, train, num_classes, **kwargs):
    batches = create_split(data, split, train=train, num_classes=num_classes, **kwargs)
    if not train:
      return batches

    def soft(step, batch):
      labels = np.eye(num_classes, dtype=np.float32)[batch['label']]
      return {**batch, 'label': labels * (np.nan if step == bad_step else 1.0)}

    return (soft(step, batch) for step, batch in enumerate(batches, 1))

  monkeypatch.setattr(input_pipeline, 'create_split', poisoned)


@pytest.mark.parametrize(
  'bad_step, save_every, log_every, steps, kept',
  [
    (3, 2, 1, 6, [2]),  # Tiny's spacing.
    (5, 1, 4, 6, [2, 3, 4]),  # Logged in fours; the newest 3 kept (keep_checkpoints).
    (6, 3, 5, 6, [3]),  # The last step: its final save is refused too.
    (4, 4, 3, 7, []),  # A save due at the bad step itself.
  ],
)
def test_nan_loss_stops_and_keeps_last_good_checkpoint(
  bad_step, save_every, log_every, steps, kept, tmp_path, monkeypatch
):
  """A step that sees NaN targets is named, and no checkpoint is saved from it on, whatever the
  spacing of saves, progress lines and the last step."""
  _poison_targets_at(monkeypatch, bad_step)
  config = tiny.get_config()
  config.num_train_steps, config.eval_every_steps = steps, steps
  config.checkpoint_every_steps, config.log_every_steps = save_every, log_every
  last_good = f'last good checkpoint is step {kept[-1]}' if kept else 'no checkpoint was saved'
  with pytest.raises(FloatingPointError, match=f'at step {bad_step}; .*{last_good}'):
    train_lib.train_and_evaluate(config, str(tmp_path))
  manager = checkpointing.create_manager(str(tmp_path), 10, read_only=True)
  assert manager.all_steps() == kept
  manager.close()


def test_a_non_finite_step_is_never_evaluated(tmp_path, monkeypatch, capsys):
  """An evaluation due at the bad step (neither a save nor a progress line) does not run: the
  run stops naming the step, before any eval line or results.json."""
  _poison_targets_at(monkeypatch, 3)
  config = tiny.get_config()
  config.num_train_steps, config.eval_every_steps = 6, 3
  config.checkpoint_every_steps, config.log_every_steps = 5, 5
  with pytest.raises(FloatingPointError, match='at step 3; .*no checkpoint was saved'):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert 'eval step 3' not in capsys.readouterr().out
  assert not (tmp_path / 'results.json').exists()


@pytest.mark.filterwarnings('ignore:overflow encountered:RuntimeWarning')
@pytest.mark.parametrize('learning_rate', [1e40])
def test_diverging_run_saves_only_finite_states_and_names_one(learning_rate, tmp_path):
  """The peak rate overflows float32, so step 1's update is non-finite while its loss (computed
  before the update) is not: every checkpoint left holds finite values, and the step the error
  names is one of them."""
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps = 6, 1
  config.optimizer.learning_rate = learning_rate
  with pytest.raises(FloatingPointError) as error:
    train_lib.train_and_evaluate(config, str(tmp_path))
  named = re.search(r'last good checkpoint is step (\d+)', str(error.value))
  manager = checkpointing.create_manager(str(tmp_path), 6, read_only=True)
  steps = manager.all_steps()
  assert (named is None) == (steps == []), (str(error.value), steps)
  for step in steps:
    params = manager.restore(step)['params']
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params)), step
  if named:
    assert int(named.group(1)) == max(steps)
  manager.close()
  if learning_rate == 1e40:
    assert 'not finite at step 1' in str(error.value) and steps == []


@pytest.mark.parametrize(
  'script, args, named',
  [
    ('train.py', ['--config.batch_sz=3'], 'unknown config field: batch_sz. Did you mean'),
    ('train.py', ['--config.zzz=3'], 'unknown config field: "zzz".'),
    ('train.py', ['--config.batch_size=abc'], '--config.batch_size=abc'),
    ('train.py', ['--config.optimizer.learning_rate=-1'], 'optimizer.learning_rate=-1.0'),
    ('train.py', ['--config.input.dataset=imagenet2013'], 'did you mean imagenet2012'),
    ('train.py', ['--config.crop_fraction=0.9'], 'config.crop_fraction is now config.input.crop'),
    ('train.py', ['--config=configs/halonet.py:h8'], "unknown HaloNet config 'h8'"),
    ('train.py', ['--config=configs/h9.py'], "No such file or directory: 'configs/h9.py'"),
    ('eval.py', [], 'no complete checkpoint'),
    (
      'train.py',
      ['--coordinator_address=127.0.0.1:1234'],
      '--coordinator_address given without --distributed',
    ),
    (
      'train.py',
      ['--distributed', '--num_processes=2', '--process_id=2'],
      '--process_id=2 must be below --num_processes=2',
    ),
  ],
)
def test_bad_command_line_fails_in_one_line(script, args, named, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  run = subprocess.run(
    [sys.executable, script, '--config=configs/tiny.py', f'--workdir={tmp_path / "run"}', *args],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=load.timeout(120),
  )
  assert run.returncode != 0
  assert named in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]
  assert 'Traceback' not in run.stderr
  assert not (tmp_path / 'run').exists()


def test_finished_run_compile_time_profile_then_rerun_changes_nothing(
  tmp_path, monkeypatch, capsys
):
  """One run: compile time reported apart, a profile of steps 2-3, files that follow the umask;
  then the same command again, which has nothing to do and rewrites nothing."""
  workdir = tmp_path / 'run'
  config = tiny.get_config()
  config.profile_steps = (2, 3)
  previous = os.umask(0o022)
  try:
    results = train_lib.train_and_evaluate(config, str(workdir))
  finally:
    os.umask(previous)
  for name in ('config.json', 'results.json'):
    assert (workdir / name).stat().st_mode & 0o777 == 0o644, name
  assert results['train_images_per_sec'] > 0
  assert results['compile_seconds']['train_step'] > 0 < results['compile_seconds']['eval_step']
  assert 'compiled in' in capsys.readouterr().out
  traces = list((workdir / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  written = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.rglob('*') if p.is_file()}
  monkeypatch.setattr(jax, 'jit', _no_compile)  # Nothing to train or evaluate: nothing compiled.
  again = train_lib.train_and_evaluate(config, str(workdir))
  assert again['step'] == config.num_train_steps
  assert {
    p: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.rglob('*') if p.is_file()
  } == written
  # A changed model is not that finished run: refused, as on any resume.
  config.model.activation = 'silu'
  with pytest.raises(errors.ConfigError, match='model.activation'):
    train_lib.train_and_evaluate(config, str(workdir))


def test_help_lists_the_main_flags():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  run = subprocess.run(
    [sys.executable, 'train.py', '--help'],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=load.timeout(120),
  )
  assert run.returncode == 0, run.stderr[-2000:]
  for flag in ('--config:', '--workdir:', 'distributed:', 'allow_config_change:'):
    assert flag in run.stdout, run.stdout
  # Every config field, with its default and the meaning written beside it in the defaults.
  listed = re.findall(r'^  (\S+) = (.+?)  +(\S.*)$', run.stdout, re.MULTILINE)
  fields = {name: (value, meaning) for name, value, meaning in listed}
  assert fields['model.block_size'] == ('8', 'b: query block side.')
  assert fields['optimizer.name'] == ("'sgd'", "'sgd' (Nesterov momentum) or 'adamw'.")
  assert len(fields) == len(traverse_util.flatten_dict(tiny.get_config().to_dict()))
  assert fields['detection.scale_range'][0] == '(0.1, 2.0)'  # Every group's fields.
  assert fields['input.crop_fraction'] == (
    '0.875',
    'eval: resize to s / crop_fraction, centre crop s.',
  )
  # Each meaning is its own field's: fine-tuning's source does not run into trainable's.
  assert fields['init_from'][1].endswith("(WORKDIR/checkpoints/STEP); '' = from scratch.")
  assert fields['trainable'] == ("'all'", "'all', or 'head' (the classifier only).")
  assert all(meaning for _, meaning in fields.values())


def test_evaluations_during_training_print_their_accuracy(tmp_path, capsys):
  config = tiny.get_config()
  config.eval_every_steps = 2
  results = train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  out = capsys.readouterr().out
  devices = (
    f"{jax.device_count()} cpu devices in 1 process(es), mesh {{'data': {jax.device_count()}"
  )
  assert devices in out and 'compute dtype float32' in out, out
  line = re.search(
    r'^eval step 2 \(raw params\): test top-1 ([\d.]+)% top-5 ([\d.]+)%$', out, re.MULTILINE
  )
  assert line, out
  assert 'eval step 4' not in out  # The final evaluation prints as the final results.
  # TensorBoard holds every step's train scalars and each evaluation as printed.
  events = event_accumulator.EventAccumulator(str(tmp_path / 'run'))
  events.Reload()
  assert [e.step for e in events.Tensors('train/loss')] == [1, 2, 3, 4]
  top1 = {
    e.step: float(tensor_util.make_ndarray(e.tensor_proto))
    for e in events.Tensors('eval/raw/test/top1')
  }
  assert sorted(top1) == [2, 4] and f'{top1[2]:.2f}' == line.group(1)
  assert top1[4] == pytest.approx(results['raw_eval']['test']['top1'])
  assert float(results['raw_eval']['test']['top1']) >= 0 and float(line.group(2)) >= float(
    line.group(1)
  )
