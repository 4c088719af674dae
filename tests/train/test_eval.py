"""eval.py reproduces the training run's final evaluation from the checkpoint alone; the EMA's
evaluation is one of its parameters."""

import datetime
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from halonet import errors
from halonet import paths
from halonet import sharding
from halonet.models import networks
from halonet.train import evaluation as eval_lib
from halonet.train import loop as train_lib
from halonet.train import optim
from halonet.train import step as train_step_lib
from tests import inputs
from tests import load

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_eval_py_matches_training_run_and_appends_records(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.num_train_steps = 6
  config.ema_decay = 0.5
  workdir = str(tmp_path)
  trained = train_lib.train_and_evaluate(config, workdir)
  assert json.loads((tmp_path / 'results.json').read_text()) == json.loads(json.dumps(trained))

  # No --config: the run's own stored config (6 steps, EMA 0.5) is evaluated.
  run = subprocess.run(
    [sys.executable, 'eval.py', f'--workdir={workdir}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'step 6 digits test (ema params): top-1' in run.stdout
  records_path = tmp_path / 'eval_records.jsonl'
  first = records_path.read_text()
  # An earlier step and another split, in process: appended beside step 6's, which stay as they
  # were (records are never replaced, whatever their keys).
  eval_lib.evaluate_checkpoint(config, workdir, step=4)
  config.input.eval_splits = ('train',)
  eval_lib.evaluate_checkpoint(config, workdir, step=6)
  assert records_path.read_text().startswith(first)
  records = paths.read_json_lines(str(records_path))
  assert [(r['step'], r['dataset'], r['split'], r['weights']) for r in records] == [
    (6, 'digits', 'test', 'raw'),
    (6, 'digits', 'test', 'ema'),
    (4, 'digits', 'test', 'raw'),
    (4, 'digits', 'test', 'ema'),
    (6, 'digits', 'train', 'raw'),
    (6, 'digits', 'train', 'ema'),
  ]
  for evaluated in records[:2]:
    final = trained[f'{evaluated["weights"]}_eval']['test']
    assert evaluated['count'] == final['count'] == 360  # Each test image exactly once.
    for key in ('top1', 'top5'):
      assert evaluated[key] == final[key]
    assert evaluated['loss'] == pytest.approx(final['loss'], rel=1e-6)
  assert records[-1]['count'] == 1437
  # When, in UTC to the second, as records from other hosts and runs are compared.
  for r in records:
    when = datetime.datetime.fromisoformat(r['evaluated_at'])
    assert when.utcoffset() == datetime.timedelta(0) and when.microsecond == 0, r['evaluated_at']
    assert abs(datetime.datetime.now(datetime.UTC) - when) < datetime.timedelta(minutes=30)

  # A changed architecture is refused before anything is restored or written.
  config.model.activation = 'silu'
  with pytest.raises(errors.ConfigError, match=r'different model \(fields: model.activation\)'):
    eval_lib.evaluate_checkpoint(config, workdir)
  assert len(paths.read_json_lines(str(records_path))) == len(records)

  # A workdir that takes no new file (a directory where the write probe's file would go) is
  # refused before the eval step compiles.
  config.model.activation = tiny.get_config().model.activation
  (tmp_path / f'.write_check_0_{os.getpid()}').mkdir()

  def compile_eval_step(*args):
    raise AssertionError('compiled for a workdir that cannot take the records')

  monkeypatch.setattr(eval_lib, 'compile_eval_step', compile_eval_step)
  with pytest.raises(errors.ConfigError, match=f'workdir {workdir} cannot be written'):
    eval_lib.evaluate_checkpoint(config, workdir)


def test_compile_seconds_are_the_time_compilation_took():
  config = tiny.get_config()
  mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
  model = networks.create_model(config)
  variables = networks.abstract_variables(config)
  before = time.perf_counter()
  eval_fn, seconds = eval_lib.compile_eval_step(model, mesh, variables, config)
  assert 0 < seconds <= time.perf_counter() - before
  images = np.zeros((config.eval_batch_size, config.image_size, config.image_size, 3), np.uint8)
  labels = np.zeros(config.eval_batch_size, np.int32)
  mask = np.arange(config.eval_batch_size) < 3
  sums = eval_fn(
    jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables),
    {'image': images, 'label': labels, 'mask': mask},
  )
  assert int(sums['count']) == 3


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path):
  # One CPU device, as a user runs it: not the 8 fake devices conftest gives this process.
  env = dict(os.environ, XLA_FLAGS='')
  run = subprocess.run(
    [sys.executable, 'train.py', '--config=configs/quickstart.py', f'--workdir={tmp_path}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(600),
    env=env,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'final test accuracy (raw params' in run.stdout
  results = json.loads((tmp_path / 'results.json').read_text())
  # 40 epochs of full batches: the digits' train split is 1797 - 360 = 1437 images, 22 x 64.
  assert results['step'] == 40 * (1437 // 64)
  assert results['raw_eval']['test']['top1'] >= 95.0, results


def test_ema_evaluation_is_an_evaluation_of_the_ema_parameters():
  """evaluate_all's 'ema' figures against a hand evaluation of the EMA parameters (a plain loop
  over the split's images: logits, argmax, the five largest, cross-entropy), which differ from
  the raw ones."""
  config = tiny.get_config()
  config.ema_decay = 0.5
  config.input.eval_splits = ('test',)
  mesh = sharding.create_mesh(config.mesh_shape)
  model = networks.create_model(config)
  tx = optim.create_optimizer(config, optim.learning_rate_schedule(config, 10, 10))
  init, abstract = train_step_lib.abstract_train_state(config, model, tx, mesh)
  state = jax.jit(init, out_shardings=train_step_lib.shardings_of(abstract))(jax.random.key(0))
  # Absolute noise: the zero-initialised head gets weights too, so predictions vary by image.
  noise = lambda p, k: p + 0.3 * jax.random.normal(k, p.shape)
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state = state.replace(ema_params=tree.unflatten(map(noise, leaves, keys)))
  eval_fn, _ = eval_lib.compile_eval_step(
    model, mesh, {'params': abstract.params, 'batch_stats': abstract.batch_stats}, config
  )
  sizes = train_step_lib.split_sizes(config, train=False)
  with jax.set_mesh(mesh):
    got = eval_lib.evaluate_all(eval_fn, state, config, sizes, mesh)

  variables = jax.device_get({'params': state.ema_params, 'batch_stats': state.batch_stats})
  apply = jax.jit(lambda images: model.apply(variables, images, train=False))
  mean, std = 255 * np.asarray(config.input.pixel_mean), 255 * np.asarray(config.input.pixel_std)
  correct, in_top5, losses, predicted = 0, 0, [], set()
  for batch in inputs.create_split(config, 'test', train=False, batch_size=40):
    real = batch['mask']
    logits = np.asarray(apply((batch['image'] - mean) / std), np.float64)[real]
    labels = batch['label'][real]
    correct += int((logits.argmax(-1) == labels).sum())
    in_top5 += int((np.argsort(-logits, -1)[:, :5] == labels[:, None]).any(-1).sum())
    predicted.update(logits.argmax(-1).tolist())
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    losses += list(log_z - logits[np.arange(len(labels)), labels])
  assert len(losses) == got['ema']['test']['count'] == 360 and len(predicted) > 3
  assert got['ema']['test']['top1'] == pytest.approx(100 * correct / 360)
  assert got['ema']['test']['top5'] == pytest.approx(100 * in_top5 / 360)
  assert correct < in_top5 < 360
  assert got['ema']['test']['loss'] == pytest.approx(np.mean(losses), rel=1e-4)
  assert got['raw']['test']['loss'] != pytest.approx(got['ema']['test']['loss'], rel=1e-3)


class _Clock:
  """time.perf_counter, moved on by the test: each batch of the evaluation takes 20 s."""

  def __init__(self):
    self.now = 1000.0  # A clock read from an arbitrary start, as perf_counter's.

  def __call__(self) -> float:
    return self.now


def test_a_long_evaluation_says_how_far_it_is_and_counts_each_example_once(monkeypatch, capsys):
  config = tiny.get_config()
  config.eval_batch_size = 120  # The 360 test digits in 3 batches.
  clock = _Clock()
  monkeypatch.setattr(eval_lib.time, 'perf_counter', clock)

  def eval_fn(variables, batch):  # Every image right and top-5, loss 1: sums as the step's.
    clock.now += 20.0
    mask = batch['mask']
    return {'count': mask.sum(), 'loss': mask.sum() * 1.0, 'top1': mask.sum(), 'top5': mask.sum()}

  mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
  result = eval_lib.evaluate(eval_fn, {}, config, 'test', 360, mesh)
  assert capsys.readouterr().out == 'eval test: batch 2/3, 40 s\n'  # Every 30 s, not sooner.
  assert (result['count'], result['top1'], result['top5'], result['loss']) == (360, 100, 100, 1)
  assert result['images_per_sec'] == 360 / 60
  with pytest.raises(RuntimeError, match="evaluated 360 examples of split 'test' but it has 361"):
    eval_lib.evaluate(eval_fn, {}, config, 'test', 361, mesh)


class _GivenLogits:
  """A model whose logits are given: what eval_step makes of them is the test."""

  dtype = 'float32'

  def __init__(self, logits):
    self.logits = logits

  def apply(self, variables, images, train):
    assert not train and images.dtype == np.float32
    return self.logits


@pytest.mark.parametrize('classes', [10, 3])
def test_eval_step_sums_top1_top5_and_loss_over_the_real_rows(classes):
  """Against NumPy on random logits: a row's label among the 5 largest (all classes when fewer),
  its cross-entropy, masked rows left out; counts exact."""
  rng = np.random.default_rng(classes)
  logits = rng.normal(size=(12, classes)).astype(np.float32)
  labels = rng.integers(0, classes, 12).astype(np.int32)
  mask = np.arange(12) < 9
  batch = {'image': np.zeros((12, 4, 4, 3), np.uint8), 'label': labels, 'mask': mask}
  sums = jax.device_get(
    eval_lib.eval_step({}, batch, model=_GivenLogits(logits), config=tiny.get_config())
  )
  ranks = (logits > logits[np.arange(12), labels][:, None]).sum(-1)  # Classes scoring higher.
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  assert int(sums['count']) == 9
  assert int(sums['top1']) == int(((ranks == 0) & mask).sum())
  assert int(sums['top5']) == int(((ranks < 5) & mask).sum())
  np.testing.assert_allclose(
    sums['loss'], ((log_z - logits[np.arange(12), labels]) * mask).sum(), rtol=1e-5
  )
  if classes <= 5:  # Every label is among the largest five.
    assert int(sums['top5']) == 9
  else:  # The random logits tell the three figures apart.
    assert int(sums['top1']) < int(sums['top5']) < 9
