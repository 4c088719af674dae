"""config.evals: each TFDS path read under tfds.testing.mock_data and scored against a NumPy
computation on the same examples read by TFDS directly; a probe on an image folder; a missing
dataset named in one line before anything compiles."""

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from halonet import errors
from halonet.data import imagenet_classes
from halonet.evaluators import run as evaluators_lib
from halonet.evaluators import scores
from halonet.evaluators import specs

NUM_CLASSES = 1000
# A class in neither ImageNet-A's nor ImageNet-R's 200: the fake model's favourite.
DECOY = min(
  set(range(NUM_CLASSES))
  - set(imagenet_classes.subset_indices('imagenet_a'))
  - set(imagenet_classes.subset_indices('imagenet_r'))
)


def _config():
  config = tiny.get_config()
  config.num_classes = NUM_CLASSES
  config.image_size = 16
  config.eval_batch_size = 4  # Mock splits of 6 or 7 examples: a padded last batch.
  config.input.data_dir = ''
  return config


def _predicted(labels: np.ndarray) -> np.ndarray:
  """The fake model's top-1: right on labels divisible by 3, the next class otherwise."""
  return np.where(labels % 3 == 0, labels, (labels + 1) % NUM_CLASSES)


def _fake_infer(batch):
  """Logits from the batch's own labels (a model that is right on a known share), rising by
  index so the rest of the top-5 is 996-999; on ReaL, right on the first of the label set
  for an even original label."""
  labels = batch['label']
  predicted = _predicted(labels)
  if 'real_label' in batch:
    first = np.argmax(batch['real_label'], axis=1)
    predicted = np.where(labels % 2 == 0, first, labels)
  logits = np.tile(np.arange(NUM_CLASSES, dtype=np.float32) * 1e-3, (len(labels), 1))
  logits[np.arange(len(labels)), predicted] = 5.0
  return {**batch, 'logits': logits, 'pre_logits': logits[:, :8]}


def _subset_infer(batch):
  """Right among every class but DECOY, which it favours: wrong on all 1,000 classes."""
  out = _fake_infer(batch)
  out['logits'][:, DECOY] = 10.0
  out['logits'][np.arange(len(batch['label'])), batch['label']] = 6.0
  return out


class _Clock:
  """time.perf_counter for the evaluators, moved on 10 s by each model call `timed` makes."""

  def __init__(self):
    self.now = 500.0

  def __call__(self) -> float:
    return self.now

  def timed(self, infer):
    def call(batch):
      self.now += 10.0
      return infer(batch)

    return call


def _read(name: str, split: str) -> list[dict]:
  return list(tfds.load(name, split=split).as_numpy_iterator())


@pytest.mark.parametrize(
  'spec, metric, dataset, splits',
  [
    ('imagenet2012_real', specs.REAL, 'imagenet2012_real', ('validation',)),
    ('imagenet_v2/threshold-0.7', specs.TOP1, 'imagenet_v2/threshold-0.7', ('test',)),
    ('imagenet_a@500', specs.SUBSET, 'imagenet_a', ('test',)),
    ('imagenet_r:test', specs.SUBSET, 'imagenet_r', ('test',)),
    ('imagenet2012_corrupted', specs.MCE, 'imagenet2012_corrupted', ('validation',)),
    ('imagenet2012_corrupted/fog_3', specs.TOP1, 'imagenet2012_corrupted/fog_3', ('validation',)),
    ('cifar10', specs.TOP1, 'cifar10', ('test',)),
    ('cifar10:train', specs.TOP1, 'cifar10', ('train',)),
    ('fewshot:oxford_iiit_pet', specs.FEWSHOT, 'oxford_iiit_pet', ('train', 'test')),
    ('fewshot:digits/5-9:train:test@20', specs.FEWSHOT, 'digits/5-9', ('train', 'test')),
  ],
)
def test_an_entry_names_its_metric_dataset_and_split(spec, metric, dataset, splits):
  evaluator = specs.parse(spec)
  assert (evaluator.metric, evaluator.dataset, evaluator.splits) == (metric, dataset, splits)
  assert evaluator.folder == ''


def test_a_path_is_an_image_folder_and_every_step_counts_from_the_run(tmp_path):
  evaluator = specs.parse(f'fewshot:{tmp_path}:a:b@3')
  assert (evaluator.dataset, evaluator.folder, evaluator.splits) == (
    'image_folder',
    str(tmp_path),
    ('a', 'b'),
  )
  assert [s for s in range(1, 11) if evaluator.due(s, 10)] == [3, 6, 9, 10]
  assert [s for s in range(1, 11) if specs.parse('imagenet_a').due(s, 10)] == [10]
  assert [s for s in range(1, 4) if specs.parse('imagenet_a@1').due(s, 3)] == [1, 2, 3]
  bucket = specs.parse('fewshot:gs://bucket/flowers')
  assert (bucket.dataset, bucket.folder) == ('image_folder', 'gs://bucket/flowers')


@pytest.mark.parametrize(
  'spec',
  [
    '',
    'fewshot:',
    'fewshot:cifar10:train',
    'fewshot:cifar10::test',
    'a:b:c',
    'cifar10:',
    'cifar10@0',
    'cifar10@x',
    'a::b',
  ],
)
def test_a_malformed_entry_is_named(spec):
  with pytest.raises(errors.ConfigError, match=f'config.evals entry {spec!r} is not'):
    specs.parse(spec)


def test_an_entry_given_twice_is_refused():
  with pytest.raises(errors.ConfigError, match="names 'imagenet_a' twice"):
    specs.parse_all(('imagenet_a', 'imagenet_a@100'))


def test_top1_real_and_the_200_class_sets_match_numpy_on_the_same_examples():
  config = _config()
  with tfds.testing.mock_data(num_examples=7):
    real = evaluators_lib.evaluate(config, specs.parse('imagenet2012_real'), _fake_infer)
    top1_sets = {
      name: evaluators_lib.evaluate(config, specs.parse(name), _fake_infer)
      for name in ('imagenet_v2/matched-frequency', 'imagenet_sketch')
    }
    subsets = {
      name: evaluators_lib.evaluate(config, specs.parse(name), _subset_infer)
      for name in ('imagenet_a', 'imagenet_r')
    }
    real_examples = _read('imagenet2012_real', 'validation')
    top1_examples = {name: _read(name, 'test') for name in top1_sets}
    subset_examples = {name: _read(name, 'test') for name in subsets}

  # ReaL: images with an empty label set are left out; the others are right when the prediction
  # is one of their labels.
  labelled = [ex for ex in real_examples if len(ex['real_label'])]
  hits = [
    (ex['real_label'][0] if ex['original_label'] % 2 == 0 else ex['original_label'])
    in set(ex['real_label'])
    for ex in labelled
  ]
  assert real['count'] == len(labelled)
  assert real['real_top1'] == pytest.approx(100 * np.mean(hits))

  for name, result in top1_sets.items():
    labels = np.array([ex['label'] for ex in top1_examples[name]])
    assert result['count'] == len(labels) == 7
    assert result['top1'] == pytest.approx(100 * np.mean(labels % 3 == 0))
    top5 = (labels % 3 == 0) | (labels >= NUM_CLASSES - 4)
    assert result['top5'] == pytest.approx(100 * np.mean(top5))

  for name, result in subsets.items():
    labels = np.array([ex['label'] for ex in subset_examples[name]])
    inside = np.isin(labels, imagenet_classes.subset_indices(name))
    assert result['top1'] == pytest.approx(100 * np.mean(inside)), name


def test_mean_corruption_error_reads_every_corruption_at_every_severity(monkeypatch):
  config = _config()
  clock = _Clock()
  monkeypatch.setattr(evaluators_lib.time, 'perf_counter', clock)
  with tfds.testing.mock_data(num_examples=2):
    result = evaluators_lib.evaluate(
      config, specs.parse('imagenet2012_corrupted'), clock.timed(_fake_infer)
    )
    errors_of = {}
    for corruption, severity, name in evaluators_lib.corrupted_datasets():
      assert name == f'imagenet2012_corrupted/{corruption}_{severity}'  # TFDS's config names.
      labels = np.array([ex['label'] for ex in _read(name, 'validation')])
      errors_of.setdefault(corruption, []).append(np.mean(labels % 3 != 0))
  assert len(errors_of) == 15 and all(len(e) == 5 for e in errors_of.values())
  expected = {c: np.mean(e) / scores.ALEXNET_CORRUPTION_ERRORS[c] for c, e in errors_of.items()}
  assert result['count'] == 15 * 5 * 2
  assert result['images_per_sec'] == pytest.approx(150 / (75 * 10.0))  # A batch per config.
  assert result['mce'] == pytest.approx(100 * np.mean(list(expected.values())))
  for corruption, ce in expected.items():
    assert result['corruption_errors'][corruption] == pytest.approx(100 * ce)


def _colour_folder(root, per_class: dict[str, int]) -> None:
  """Class k's images are noisy squares of one colour, per split."""
  rng = np.random.default_rng(0)
  colours = {'red': (200, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 200)}
  for split, count in per_class.items():
    for name, colour in colours.items():
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (12, 12, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i}.png')


def _colour_infer(batch):
  """Pre-logits: each image's mean colour, which tells its class."""
  features = batch['image'].reshape(len(batch['image']), -1, 3).mean(axis=1)
  return {**batch, 'pre_logits': features, 'logits': np.zeros((len(features), 3), np.float32)}


def test_a_probe_on_an_image_folder_fits_the_shots_it_can(tmp_path, capsys, monkeypatch):
  _colour_folder(tmp_path, {'train': 4, 'test': 5})
  config = _config()
  config.fewshot_shots = (1, 3, 5)
  config.fewshot_seeds = 2
  config.fewshot_l2 = 1e-3
  clock = _Clock()
  monkeypatch.setattr(evaluators_lib.time, 'perf_counter', clock)
  probe = specs.parse(f'fewshot:{tmp_path}')
  result = evaluators_lib.evaluate(config, probe, clock.timed(_colour_infer))
  # 12 train images in 3 batches of 4, 15 test images in 4: 27 images in 70 s.
  assert result['images_per_sec'] == pytest.approx(27 / 70)
  assert result['count'] == 15
  assert result['1shot'] == result['3shot'] == 100.0
  assert result['1shot_std'] == 0.0
  assert '5shot' not in result
  out = capsys.readouterr().out
  assert '5 shots left out: a class of train has 4 examples' in out
  # A pass longer than PROGRESS_SECONDS says how far it is: the test split's 4th batch at 40 s.
  assert f'fewshot:{tmp_path}: batch 4/4, 40 s' in out
  assert evaluators_lib.summary(probe, result) == '1-shot 100.0±0.0% 3-shot 100.0±0.0%'


def test_each_kind_of_result_is_summed_up_in_its_own_words():
  numbers = {'top1': 76.5, 'top5': 93.25, 'real_top1': 82.125, 'mce': 60.04}
  summary = lambda spec: evaluators_lib.summary(specs.parse(spec), numbers)
  assert summary('imagenet_v2/matched-frequency') == 'top-1 76.50% top-5 93.25%'
  assert summary('imagenet_a') == 'top-1 76.50% (200 classes)'
  assert summary('imagenet2012_real') == 'ReaL top-1 82.12%'
  assert summary('imagenet2012_corrupted') == 'mCE 60.0%'


def test_a_missing_dataset_is_named_with_where_and_how_before_anything_runs(tmp_path):
  config = _config()
  config.input.dataset = 'imagenet2012'  # TFDS sets are then read from its data_dir.
  config.input.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError) as missing:
    evaluators_lib.check_available(config, specs.parse_all(('imagenet_v2/topimages',)))
  assert str(missing.value) == (
    f'imagenet_v2/topimages: no prepared data in {tmp_path}/imagenet_v2/topimages/3.0.0; '
    f'`tfds build imagenet_v2/topimages --data_dir={tmp_path}`.'
  )
  with pytest.raises(FileNotFoundError) as missing:
    evaluators_lib.check_available(config, specs.parse_all(('imagenet2012_real',)))
  manual = f'{tmp_path}/downloads/manual'
  assert str(missing.value).endswith(
    f'download ILSVRC2012_img_val.tar by hand into {manual}, then run '
    f'`tfds build imagenet2012_real --data_dir={tmp_path} --manual_dir={manual}`.'
  )
