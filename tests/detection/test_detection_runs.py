"""Whole detection runs through the commands' entry points: a toy run's files, its rerun, eval.py
on its workdir, predict.py's detections and drawings, kill -9 and resume bit-exact, a backbone
started from a classification run, and bad configs refused in one line before anything is
built."""

import math
import os
import signal
import subprocess
import sys

from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from configs import detection as detection_configs
from configs import tiny
from halonet import errors
from halonet import paths
from halonet import sharding
from halonet.data import digit_scenes
from halonet.detection import checks
from halonet.detection import data as data_lib
from halonet.detection import evaluation
from halonet.detection import predict
from halonet.detection import train_step as step_lib
from halonet.detection import training
from halonet.train import checkpointing
from halonet.train import loop as classification
from halonet.train import optim
from halonet.train import workdir as workdir_lib
from tests import hlo
from tests import load
from tests import torch_side
from tests.detection import toy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INTERRUPTED_TRAIN = os.path.join(REPO, 'tests', 'scripts', 'interrupted_train.py')
STEPS = toy.RUN_FIELDS['num_train_steps']
NUMBERS = {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}


def _state(workdir, step=STEPS):
  manager = checkpointing.create_manager(workdir, 3, read_only=True)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    manager.close()


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory):
  """A toy run of STEPS steps, saved every step: (workdir, its results)."""
  workdir = str(tmp_path_factory.mktemp('unbroken'))
  results = training.train_and_evaluate(toy.run_config(checkpoint_every_steps=1), workdir)
  return workdir, results


def test_a_run_writes_its_scores_and_a_rerun_changes_nothing(unbroken, capsys):
  workdir, results = unbroken
  assert results['step'] == STEPS
  scores = results['eval']['test']
  assert set(scores['bbox']) == set(scores['segm']) == NUMBERS
  assert scores['count'] == 500 and scores['ms_per_image'] > 0
  assert paths.read_json(workdir_lib.file(workdir, workdir_lib.RESULTS)) == results
  (record,) = paths.read_json_lines(workdir_lib.file(workdir, workdir_lib.EVAL_RECORDS))
  assert record['task'] == 'detection' and record['step'] == STEPS
  assert record['bbox'] == scores['bbox']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  before = os.path.getmtime(workdir_lib.file(workdir, workdir_lib.RESULTS))
  again = training.train_and_evaluate(toy.run_config(checkpoint_every_steps=1), workdir)
  assert again == results and 'already finished' in capsys.readouterr().out
  assert os.path.getmtime(workdir_lib.file(workdir, workdir_lib.RESULTS)) == before


def test_eval_py_scores_the_workdir_as_the_run_did(unbroken, capsys):
  workdir, results = unbroken
  out = evaluation.evaluate_checkpoint(workdir_lib.load_config(workdir), workdir)
  assert out['step'] == STEPS
  for kind in ('bbox', 'segm'):
    assert out['eval']['test'][kind] == results['eval']['test'][kind]
  printed = capsys.readouterr().out
  assert 'AP^bb' in printed and 'AP^mk' in printed and 'ms/image' in printed
  assert len(paths.read_json_lines(workdir_lib.file(workdir, workdir_lib.EVAL_RECORDS))) == 2


def _run(args, workdir):
  return subprocess.run(
    [sys.executable, *args, f'--workdir={workdir}', *toy.run_flags(checkpoint_every_steps=1)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
  )


@pytest.mark.slow
def test_kill_9_then_resume_equals_the_unbroken_run(unbroken, tmp_path, capsys):
  """SIGKILLed as it reads the batch of step 5 (saves of earlier steps in flight), then rerun
  (train.py's program, in this process): the final state is bit-identical to the unbroken run's
  (the input and the samplers' draws are functions of the step)."""
  workdir = str(tmp_path / 'killed')
  ahead = sharding.PREFETCH_BATCHES
  killed = _run([INTERRUPTED_TRAIN, 'SIGKILL', str(2 + ahead + 1), '-', '0'], workdir)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  saved = ocp.path.step.checkpoint_steps(os.path.join(workdir, 'checkpoints'))
  assert saved and max(saved) < STEPS
  capsys.readouterr()
  training.train_and_evaluate(toy.run_config(checkpoint_every_steps=1), workdir)
  done = capsys.readouterr().out
  assert f'resumed from checkpoint at step {max(saved)}' in done
  assert 'AP^bb' in done
  jax.tree.map(np.testing.assert_array_equal, _state(workdir), _state(unbroken[0]))


def test_the_backbone_starts_from_a_classification_run(tmp_path, capsys):
  source = str(tmp_path / 'classifier')
  config = tiny.get_config()
  config.num_train_steps = 2
  classification.train_and_evaluate(config, source)
  # The first step's rate is 0 (linear warmup from 0): after it the backbone is the source's.
  detection = toy.run_config(
    init_from=source,
    num_train_steps=1,
    checkpoint_every_steps=1,
    eval_batch_size=256,
  )
  detection.optimizer.warmup_epochs = 1.0
  workdir = str(tmp_path / 'detector')
  training.train_and_evaluate(detection, workdir)
  assert f'backbone initialised from {source} step 2' in capsys.readouterr().out
  started, classifier = _state(workdir, 1), _state(source, 2)
  backbone = dict(started['params']['backbone'])
  assert set(backbone) == set(classifier['params'])
  for name in backbone:
    jax.tree.map(np.testing.assert_array_equal, backbone[name], classifier['params'][name])
  jax.tree.map(np.testing.assert_array_equal, started['batch_stats'], classifier['batch_stats'])
  with pytest.raises(errors.ConfigError, match='is a detection run; a detection run starts'):
    training.train_and_evaluate(toy.run_config(init_from=workdir), str(tmp_path / 'third'))


def test_the_edges_of_each_range_are_accepted():
  checks.validate_config(
    toy.run_config(
      **{
        'detection.roi_batch_per_image': 4,
        'detection.fpn_width': 1,
        'detection.max_objects': 1,
        'detection.rpn_pre_nms_top_n': (1, 1),
        'detection.scale_range': (1.0, 1.0),
        'detection.anchor_ratios': (1.0,),
        'detection.anchor_sizes': (1, 16, 32, 64, 128),
        'image_size': 64,
      }
    )
  )


@pytest.mark.parametrize(
  'field, value, named',
  [
    ('task', 'segmentation', "config.task='segmentation' is not one of"),
    ('image_size', 96, 'config.image_size=96 must be a multiple of 64'),
    ('input.dataset', 'digits', "config.input.dataset='digits' is not a detection dataset"),
    ('detection.anchor_sizes', (8, 16), 'config.detection.anchor_sizes=(8, 16) must be 5'),
    ('detection.scale_range', (1.5, 0.5), 'config.detection.scale_range=(1.5, 0.5) must'),
    ('detection.roi_batch_per_image', 3, 'config.detection.roi_batch_per_image=3 must be >= 4'),
    ('ema_decay', 0.9, 'config.ema_decay=0.9 must be 0.0: detection keeps no EMA'),
    ('model.widths', (8, 16, 0, 32), 'config.model.widths=(8, 16, 0, 32): every entry'),
    ('detection.fpn_width', 0, 'config.detection.fpn_width=0 must be >= 1'),
    ('detection.max_objects', 0, 'config.detection.max_objects=0 must be >= 1'),
    ('detection.anchor_sizes', (8, 16, 0, 64, 128), 'anchor_sizes=(8, 16, 0, 64, 128) must be'),
    ('detection.anchor_ratios', (), 'config.detection.anchor_ratios=() must be positive'),
    ('detection.anchor_ratios', (0.5, 0.0), 'anchor_ratios=(0.5, 0.0) must be positive'),
    ('detection.rpn_pre_nms_top_n', (64,), 'rpn_pre_nms_top_n=(64,) must be (training, inf'),
    ('detection.rpn_post_nms_top_n', (64, 0), 'rpn_post_nms_top_n=(64, 0) must be (training'),
    ('detection.scale_range', (0.0, 1.0), 'config.detection.scale_range=(0.0, 1.0) must'),
    ('image_size', 32, 'config.image_size=32 must be a multiple of 64'),
    ('trainable', 'head', "config.trainable='head' must be 'all'"),
    ('evals', ('imagenet_a',), "config.evals=('imagenet_a',) must be ()"),
    ('input.mixup_alpha', 0.2, 'config.input.mixup_alpha=0.2 must be 0.0'),
    ('input.randaugment_layers', 2, 'config.input.randaugment_layers=2 must be 0'),
    ('mesh_shape', (1, 8), r'config.mesh_shape=(1, 8): detection splits images over the data'),
  ],
)
def test_a_bad_config_is_named_in_one_line(field, value, named):
  config = toy.run_config(**{field: value})
  with pytest.raises(errors.ConfigError, match=named.replace('(', r'\(').replace(')', r'\)')) as e:
    checks.validate_config(config)
  assert '\n' not in str(e.value)


def test_predictions_are_in_each_images_own_pixels_and_drawn(unbroken, tmp_path):
  workdir, _ = unbroken
  predictor = predict.load(workdir)
  scenes = [digit_scenes.scene('test', 0, size=64)['image'], np.zeros((40, 100, 3), np.uint8)]
  found = predictor.detect(scenes, score_threshold=0.0)
  for image, one in zip(scenes, found):
    height, width = image.shape[:2]
    assert one['masks'].shape == (len(one['boxes']), height, width)
    assert (one['boxes'] >= 0).all() and (one['boxes'][:, 2] <= width).all()
    assert (one['boxes'][:, 3] <= height).all()
    assert (np.diff(one['scores']) <= 0).all()  # Best first.
    for box, mask in zip(one['boxes'], one['masks']):  # Each mask lies inside its own box.
      ys, xs = np.nonzero(mask)
      if len(xs):
        assert xs.min() >= np.floor(box[0]) and xs.max() < np.ceil(box[2])
  Image.fromarray(scenes[0]).save(tmp_path / 'scene.png')
  (tmp_path / 'notes.txt').write_text('not an image')
  done = subprocess.run(
    [sys.executable, 'predict.py', f'--workdir={workdir}', '--score_threshold=0', str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(180),
  )
  assert done.returncode == 1, done.stderr[-3000:]  # One file was left out.
  assert f'ERROR {tmp_path / "notes.txt"}: not a decodable image' in done.stderr
  written = paths.read_json(os.path.join(workdir, 'detections.json'))
  (prediction,) = written['predictions']
  assert prediction['file'] == str(tmp_path / 'scene.png')
  assert len(prediction['detections']) == len(found[0]['boxes'])
  assert Image.open(prediction['drawn']).format == 'PNG'


@pytest.mark.slow
def test_the_quick_start_reaches_the_box_and_mask_ap_it_states(tmp_path):
  """The README's detection quick-start, as a user runs it (one CPU device): at least 45 box AP
  and 45 mask AP on the 500 test scenes (53.5 and 53.5 on this project's machine)."""
  run = subprocess.run(
    [sys.executable, 'train.py', '--config=configs/detection.py:digits', f'--workdir={tmp_path}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(600),
    env=dict(os.environ, XLA_FLAGS=''),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  results = paths.read_json(tmp_path / workdir_lib.RESULTS)
  assert results['step'] == 400
  scores = results['eval']['test']
  assert scores['bbox']['AP'] >= 45.0 and scores['segm']['AP'] >= 45.0, scores
  assert 'AP^bb' in run.stdout and 'img/s' in run.stdout and 'ETA' in run.stdout


def test_the_train_step_on_8_devices_all_reduces_only_parameter_sized_tensors():
  """Data parallel as the classifier: each image and its objects stay on their device; only
  gradients and loss normalisers cross devices (no batch-sized all-gather)."""
  config = toy.run_config(checkpoint_every_steps=1)
  mesh = sharding.create_mesh(config.mesh_shape)
  assert mesh.shape['data'] == 8
  detector = evaluation.detector_of(config)
  schedule = optim.learning_rate_schedule(config, 100, STEPS)
  tx = optim.create_optimizer(config, schedule)
  _, abstract = step_lib.abstract_state(config, detector, tx, mesh)
  step = step_lib.make_train_step(
    config, detector, tx, schedule, mesh, jax.tree.map(lambda a: a.sharding, abstract)
  )
  compiled = step.lower(abstract, step_lib.train_batch_specs(config)).compile()
  collectives = hlo.hlo_ops(compiled.as_text(), hlo.COLLECTIVES)
  assert {op for op, _ in collectives} == {'all-reduce'}, collectives
  reduced = [dims for _, shape in collectives for dims in hlo.array_dims(shape)]
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  assert sum(math.prod(dims) for dims in reduced) < 1.5 * num_params


def test_the_batch_specs_are_what_the_input_makes():
  config = toy.run_config()
  example = next(
    data_lib.train_batches(config, data_lib.source(config, 'train', train=True), start_step=0)
  )
  for key, spec in step_lib.train_batch_specs(config).items():
    assert (example[key].shape, example[key].dtype) == (spec.shape, spec.dtype), key


def test_the_paper_rows_are_torchvisions_mask_rcnn_part_by_part(tmp_path):
  """configs/detection.py's r50_se without SE has, part by part, the parameters of torchvision's
  ResNet-50 FPN Mask R-CNN (its BatchNorm frozen, so only the convolutions count in the body);
  every paper row validates and builds at its 1024 px."""
  torch_side.run_script('torchvision_mask_rcnn_sizes.py', tmp_path)
  expected = paths.read_json(tmp_path / 'sizes.json')
  config = detection_configs.get_config('r50_se')
  config.model.use_se = False
  mesh = sharding.create_mesh((-1, 1))
  tx = optim.create_optimizer(config, lambda _: 0.0)
  _, abstract = step_lib.abstract_state(config, evaluation.detector_of(config), tx, mesh)
  heads = abstract.params['detector']
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(heads['fpn']) == expected['fpn']
  assert count(heads['rpn_head']) == expected['rpn_head']
  assert count(heads['box_head']) == expected['box_head']
  assert count(heads['mask_head']) == expected['mask_head']
  body = traverse_util.flatten_dict(abstract.params['backbone'], sep='/')
  kernels = [x for name, x in body.items() if name.endswith('kernel') and name != 'head/kernel']
  assert sum(x.size for x in kernels) == expected['body']  # Convolutions (1x1 ones as Dense).
  for name in detection_configs.ROWS:
    checks.validate_config(detection_configs.get_config(name))


def test_a_timm_halo_network_is_a_backbone_too():
  """timm's converted networks (config.model.arch) sow the same four stages: the pyramid is built
  on their widths."""
  config = detection_configs.get_config('r50_se')
  config.model.arch, config.image_size = 'halonet26t', 256
  checks.validate_config(config)
  tx = optim.create_optimizer(config, lambda _: 0.0)
  mesh = sharding.create_mesh((-1, 1))
  _, abstract = step_lib.abstract_state(config, evaluation.detector_of(config), tx, mesh)
  fpn = abstract.params['detector']['fpn']
  widths = [fpn[name]['kernel'].shape[2] for name in sorted(fpn) if name.startswith('lateral')]
  assert widths == [256, 512, 1024, 2048]  # halonet26t's stage widths, strides 4-32.
