"""Input pipeline: shapes, labels, sharding, padding, exact resume, crops and mixing, the
sources' errors; RandAugment's own tests are tests/data/test_randaugment.py."""

import itertools
import os
import pathlib
import re
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import tiny
from halonet import defaults
from halonet.data import pipeline as input_pipeline
from halonet.data import preprocessing
from halonet.data import randaugment
from halonet.data import sources as data_sources
from tests import inputs

NUM_CLASSES = 3
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)  # One per class.
SPLIT_SIZES = {'train': 12, 'val': 7}

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> str:
  """JPEGs whose class is readable from the pixels (solid red, green, blue) and whose index is
  readable from the brightness."""
  root = tmp_path_factory.mktemp('folder')
  for split, n in SPLIT_SIZES.items():
    for i in range(n):
      label = i % NUM_CLASSES
      os.makedirs(root / split / f'c{label}', exist_ok=True)
      colour = (COLOURS[label] * (1.0 - i / 40)).round().astype(np.uint8)
      image = np.broadcast_to(colour, (20 + i, 24, 3))  # Varied, non-square shapes.
      Image.fromarray(np.ascontiguousarray(image)).save(root / split / f'c{label}' / f'{i}.jpg')
  return str(root)


def folder_config(folder, **overrides):
  """The tiny config reading `folder`; overrides of config.input's fields or top-level ones."""
  config = tiny.get_config()
  config.input.dataset = 'image_folder'
  config.input.data_dir = folder
  config.image_size = 16
  config.num_classes = NUM_CLASSES
  config.input.eval_splits = ('val',)
  config.input.shuffle_buffer = 16
  config.batch_size = 4
  config.update_from_flattened_dict(
    {(f'input.{k}' if k in config.input else k): v for k, v in overrides.items()}
  )
  return config


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_train_batches_are_uint8_crops_with_labels_matching_pixels(folder):
  config = folder_config(folder)
  for batch in take(inputs.create_split(config, 'train', train=True, batch_size=4), 4):
    assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32
    # A solid colour stays solid under crop/flip: the dominant channel is the class.
    mean_rgb = batch['image'].reshape(4, -1, 3).mean(axis=1)
    np.testing.assert_array_equal(mean_rgb.argmax(axis=-1), batch['label'])


def test_eval_is_deterministic_and_padded_batches_count_each_example_once(folder):
  config = folder_config(folder)
  first, second = (
    list(inputs.create_split(config, 'val', train=False, batch_size=4)) for _ in range(2)
  )
  assert len(first) == 2
  for a, b in zip(first, second):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(a[key], b[key])
  masks = np.concatenate([b['mask'] for b in first])
  assert masks.dtype == np.bool_ and masks.sum() == SPLIT_SIZES['val'] == data_sources.num_examples(
    config.input, 'val', config.num_classes
  )
  images = np.concatenate([b['image'] for b in first])[masks]
  labels = np.concatenate([b['label'] for b in first])[masks]
  np.testing.assert_array_equal(images.reshape(len(images), -1, 3).mean(1).argmax(-1), labels)


def test_eval_shards_of_two_processes_are_disjoint_and_complete(folder):
  config = folder_config(folder)
  seen = []
  for index in range(2):
    batches = list(
      inputs.create_split(
        config, 'val', train=False, batch_size=2, process_index=index, process_count=2
      )
    )
    assert len(batches) == 2  # ceil(ceil(7 / 2) / 2) on both processes, so steps agree.
    for b in batches:
      seen += [
        img.tobytes() + bytes([label])
        for img, label, m in zip(b['image'], b['label'], b['mask'])
        if m
      ]
  assert len(seen) == SPLIT_SIZES['val']
  assert len(set(seen)) == len(seen)  # Every image has its own brightness.


def test_start_step_resumes_the_exact_stream_across_epochs(folder):
  config = folder_config(
    folder, randaugment_layers=2, randaugment_magnitude=10, mixup_alpha=0.2, cutmix_alpha=1.0
  )
  assert (
    input_pipeline.steps_per_epoch(
      data_sources.num_examples(config.input, 'train', config.num_classes), config.batch_size
    )
    == 3
  )
  unbroken = take(inputs.create_split(config, 'train', train=True, batch_size=4), 7)
  assert unbroken[4]['label'].shape == (4, NUM_CLASSES)  # Soft labels under mixup/cutmix.
  np.testing.assert_allclose(unbroken[4]['label'].sum(-1), 1.0, rtol=1e-6)
  for start in (4, 5):  # Epoch 1, its step 1 and its step 2.
    resumed = take(
      inputs.create_split(config, 'train', train=True, batch_size=4, start_step=start), 7 - start
    )
    for a, b in zip(unbroken[start:], resumed, strict=True):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  # A new epoch is a new shuffle, not a replay.
  assert not np.array_equal(unbroken[0]['image'], unbroken[3]['image'])


def test_cache_reads_the_files_once_and_yields_the_same_stream(folder, monkeypatch):
  """config.input.cache keeps the encoded examples after the first read: an image folder's
  stream is the same (its order comes from the shuffle, not the files), but read once."""
  reads = []
  read = data_sources.read

  def counted(data, split, *args, **kwargs):
    reads.append(split)
    return read(data, split, *args, **kwargs)

  monkeypatch.setattr(data_sources, 'read', counted)
  streams = {}
  for cache in (False, True):
    reads.clear()
    config = folder_config(folder, cache=cache)
    streams[cache] = take(inputs.create_split(config, 'train', train=True, batch_size=4), 7)
    assert reads == (['train'] if cache else ['train'] * 3), cache  # 7 steps: 3 epochs.
  for a, b in zip(streams[False], streams[True]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_a_split_smaller_than_one_global_batch_and_training_on_imagenet_v2_are_refused(folder):
  config = folder_config(folder)
  with pytest.raises(ValueError, match=r'train of image_folder has 12 examples, fewer than one '):
    inputs.create_split(config, 'train', train=True, batch_size=4, process_count=4)
  take(inputs.create_split(config, 'train', train=True, batch_size=4, process_count=3), 1)
  config.input.dataset = 'imagenet_v2/matched-frequency'
  with pytest.raises(ValueError, match='imagenet_v2/matched-frequency has only a test split'):
    inputs.create_split(config, 'test', train=True, batch_size=4)
  config.num_classes, config.image_size = 1000, 16
  with tfds.testing.mock_data(num_examples=5):  # Evaluating on it is what it is for.
    evals = list(inputs.create_split(config, 'test', train=False, batch_size=4))
  assert [b['mask'].sum() for b in evals] == [4, 1]


def test_randaugment_off_is_crop_flip_only_and_high_magnitude_changes_images(folder):
  def first_batch(layers, magnitude):
    config = folder_config(folder, randaugment_layers=layers, randaugment_magnitude=magnitude)
    return next(inputs.create_split(config, 'train', train=True, batch_size=4))['image']

  plain = first_batch(0, 0)
  np.testing.assert_array_equal(first_batch(2, 0), plain)
  np.testing.assert_array_equal(first_batch(0, 30), plain)
  assert not np.array_equal(first_batch(3, 30), plain)


def test_mock_imagenet_train_and_eval():
  config = tiny.get_config()
  config.input.dataset = 'imagenet2012'
  config.num_classes = 1000
  config.image_size = 16
  config.input.eval_splits = ('validation',)
  config.batch_size = 4
  with tfds.testing.mock_data(num_examples=6):
    assert (
      data_sources.num_examples(config.input, 'validation', config.num_classes) == 6
    )  # Counted: no metadata.
    batch = next(inputs.create_split(config, 'train', train=True, batch_size=4))
    assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.uint8
    assert ((batch['label'] >= 0) & (batch['label'] < 1000)).all()
    evals = list(inputs.create_split(config, 'validation', train=False, batch_size=4))
  assert sum(b['mask'].sum() for b in evals) == 6 and evals[-1]['mask'].tolist() == [1, 1, 0, 0]


def test_digits_upscale_from_8x8(tmp_path):
  config = tiny.get_config()
  config.input.data_dir = str(tmp_path / 'digits')
  batch = next(inputs.create_split(config, 'test', train=False, batch_size=8))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].max() > 200
  assert (
    data_sources.num_examples(config.input, 'train', config.num_classes)
    + data_sources.num_examples(config.input, 'test', config.num_classes)
    == 1797
  )


@pytest.mark.parametrize('dataset', ['imagenet2012', 'image_folder'])
def test_missing_data_names_the_directory(tmp_path, dataset):
  config = tiny.get_config()
  config.input.dataset = dataset
  config.input.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere') as error:
    inputs.create_split(config, 'train', train=True, batch_size=4)
  if dataset == 'imagenet2012':  # Looked for where asked, with the manual download's place.
    nowhere = tmp_path / 'nowhere'
    assert str(error.value).startswith(f'imagenet2012: no prepared data in {nowhere}')
    assert f'into {nowhere}/downloads/manual, then run `tfds build imagenet2012' in str(error.value)
    config.input.manual_dir = str(tmp_path / 'tars')
    with pytest.raises(FileNotFoundError, match=f'into {tmp_path}/tars, then') as error:
      inputs.create_split(config, 'train', train=True, batch_size=4)
    assert f'--data_dir={nowhere} --manual_dir={tmp_path}/tars`' in str(error.value)


def test_normalize_images_standardises_by_the_configs_mean_and_std():
  config = defaults.base_config()
  images = np.array([[0, 128, 255], [124, 116, 104]], np.uint8)  # Two RGB pixels.
  want = (images / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  out = preprocessing.normalize_images(images, config.input, np.float32)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)  # float32 of values near 0.
  config.input.pixel_mean, config.input.pixel_std = (
    (0.5, 0.5, 0.5),
    (0.5, 0.5, 0.5),
  )  # haloregnetz_b's.
  np.testing.assert_allclose(
    preprocessing.normalize_images(images, config.input, np.float32), images / 127.5 - 1, atol=1e-6
  )


def test_crop_area_and_flip_follow_the_config(tmp_path):
  """Images bright on the left half: without flips no crop puts the bright side right."""
  for i in range(8):
    os.makedirs(tmp_path / 'train' / 'c0', exist_ok=True)
    image = np.zeros((24, 24, 3), np.uint8)
    image[:, :12] = 200 + i
    Image.fromarray(image).save(tmp_path / 'train' / 'c0' / f'{i}.png')

  def left_minus_right(**overrides):
    config = folder_config(str(tmp_path), num_classes=1, batch_size=8, **overrides)
    images = next(inputs.create_split(config, 'train', train=True, batch_size=8))['image']
    images = images.astype(np.float32)  # 16 x 16: compare the outer 6 columns of each side.
    return images[:, :, :6].mean(axis=(1, 2, 3)) - images[:, :, -6:].mean(axis=(1, 2, 3))

  # The whole image, unflipped: the full contrast of each of the 8 images, bright side left.
  whole = left_minus_right(crop_area_range=(1.0, 1.0), random_flip=False)
  np.testing.assert_allclose(np.sort(whole), 200 + np.arange(8), atol=2)
  assert (left_minus_right(random_flip=False) > -1).all()
  assert (left_minus_right(crop_area_range=(1.0, 1.0), random_flip=True) < -100).any()  # Flipped.


@pytest.mark.parametrize('suffix', ['png', 'jpg'])
def test_inception_crops_cover_the_area_range_at_three_quarters_to_four_thirds_aspect(
  tmp_path, suffix
):
  """Pixels that encode their own coordinates (red: column, green: row) give each crop's box
  back from its corners: every box's share of the area lies in crop_area_range, its aspect in
  [3/4, 4/3], and boxes below a fifth of the image occur (the sampler needs a tenth covered)."""
  height, width = 160, 200
  rows, cols = np.mgrid[0:height, 0:width]
  image = np.stack([cols * 255 / (width - 1), rows * 255 / (height - 1), 0 * rows], -1)
  os.makedirs(tmp_path / 'train' / 'c0')
  for i in range(8):
    Image.fromarray(image.round().astype(np.uint8)).save(
      tmp_path / 'train' / 'c0' / f'{i}.{suffix}', quality=95
    )
  config = folder_config(str(tmp_path), num_classes=1, crop_area_range=(0.08, 0.5))
  config.image_size, config.input.random_flip = 32, False
  crops = np.concatenate(
    [b['image'] for b in take(inputs.create_split(config, 'train', train=True, batch_size=8), 4)]
  ).astype(np.float64)
  # Output pixels sample the box at (i + 0.5) / 32 of its side: first to last spans 31 / 32.
  box_width = (crops[:, 4:-4, -1, 0] - crops[:, 4:-4, 0, 0]).mean(1) * (width - 1) / 255 * 32 / 31
  box_height = (crops[:, -1, 4:-4, 1] - crops[:, 0, 4:-4, 1]).mean(1) * (height - 1) / 255 * 32 / 31
  area = box_width * box_height / (width * height)
  aspect = box_width / box_height
  assert ((area > 0.08 - 0.02) & (area < 0.5 + 0.03)).all(), area
  assert ((aspect > 3 / 4 - 0.06) & (aspect < 4 / 3 + 0.08)).all(), aspect
  assert (area < 0.2).sum() >= 3 and (area > 0.35).sum() >= 3, area
  assert (aspect < 0.9).any() and (aspect > 1.1).any(), aspect
  # Each box lies inside the image, at places that vary in both directions.
  left = crops[:, 4:-4, 0, 0].mean(1) * (width - 1) / 255 - box_width / 64
  top = crops[:, 0, 4:-4, 1].mean(1) * (height - 1) / 255 - box_height / 64
  assert ((left > -2) & (left + box_width < width + 2)).all(), left
  assert ((top > -2) & (top + box_height < height + 2)).all(), top
  assert (left > 8).sum() >= 3 and (top > 8).sum() >= 3, (left, top)


def test_grey_images_train_as_three_equal_channels(tmp_path):
  os.makedirs(tmp_path / 'train' / 'c0')
  grey = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
  for i, suffix in enumerate(['jpg', 'png'] * 2):
    Image.fromarray(grey, mode='L').save(tmp_path / 'train' / 'c0' / f'{i}.{suffix}')
  config = folder_config(str(tmp_path), num_classes=1)
  images = next(inputs.create_split(config, 'train', train=True, batch_size=4))['image']
  assert images.shape == (4, 16, 16, 3)
  assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
  assert images.std() > 10  # The picture, not a blank.


def test_the_configs_layers_and_magnitude_reach_rand_augment(monkeypatch):
  made = []

  class Recorded(randaugment.RandAugment):
    def __init__(self, num_layers, magnitude):
      made.append((num_layers, magnitude))
      super().__init__(num_layers, magnitude)

  monkeypatch.setattr(preprocessing.randaugment, 'RandAugment', Recorded)
  config = tiny.get_config()
  config.input.randaugment_layers, config.input.randaugment_magnitude = 3, 7
  preprocessing.train_preprocess(config.input, 16)
  assert made == [(3, 7)]
  for layers, magnitude in ((0, 7), (3, 0)):  # Either at 0: no RandAugment.
    config.input.randaugment_layers, config.input.randaugment_magnitude = layers, magnitude
    preprocessing.train_preprocess(config.input, 16)
  assert made == [(3, 7)]


@pytest.fixture
def folder_with_bad_files(folder, tmp_path) -> str:
  """A copy of `folder` with a truncated JPEG and a text file named .png in its train split."""
  root = tmp_path / 'with_bad'
  shutil.copytree(folder, root)
  truncated = root / 'train' / 'c0' / '0.jpg'
  truncated.write_bytes(truncated.read_bytes()[:200])
  (root / 'train' / 'c1' / 'notes.png').write_text('not an image')
  return str(root)


def test_undecodable_files_are_named_in_one_line(folder_with_bad_files):
  config = folder_config(folder_with_bad_files)
  with pytest.raises(ValueError) as error:
    data_sources.num_examples(config.input, 'train', config.num_classes)
  message = str(error.value)
  assert '2 file(s)' in message and '\n' not in message
  assert os.path.join('c0', '0.jpg') in message and os.path.join('c1', 'notes.png') in message
  assert 'skip_bad_images' in message


def test_undecodable_files_are_skipped_when_asked_and_each_named(folder_with_bad_files, caplog):
  config = folder_config(folder_with_bad_files, skip_bad_images=True)
  assert (
    data_sources.num_examples(config.input, 'train', config.num_classes) == SPLIT_SIZES['train'] - 1
  )  # 12 - 1 + 1 - 2.
  assert 'notes.png' in caplog.text and os.path.join('c0', '0.jpg') in caplog.text
  # One epoch reads each good file once and never the bad ones: eval-style pass, every image.
  batches = list(inputs.create_split(config, 'train', train=False, batch_size=4))
  seen = sum(int(b['mask'].sum()) for b in batches)
  assert seen == SPLIT_SIZES['train'] - 1
  assert len(take(inputs.create_split(config, 'train', train=True, batch_size=4), 6)) == 6


def test_num_classes_below_the_datasets_is_refused_and_labels_are_checked(folder):
  config = folder_config(folder, num_classes=NUM_CLASSES - 1)
  with pytest.raises(
    ValueError, match=f'num_classes={NUM_CLASSES - 1} is smaller than the {NUM_CLASSES} classes'
  ):
    data_sources.check_num_classes(config.input, 'train', config.num_classes)
  for enough in (NUM_CLASSES, NUM_CLASSES + 5):  # As many classes or more (a larger head): fine.
    data_sources.check_num_classes(config.input, 'train', enough)
  # Read anyway, the first label beyond the model's classes stops the stream naming it.
  with pytest.raises(tf.errors.InvalidArgumentError, match=f'num_classes={NUM_CLASSES - 1}'):
    list(inputs.create_split(config, 'val', train=False, batch_size=4))


def test_unknown_tfds_name_fails_in_one_line_with_close_matches():
  config = tiny.get_config()
  config.input.dataset = 'imagenet2013'
  with pytest.raises(ValueError) as error:
    data_sources.num_examples(config.input, 'train', config.num_classes)
  message = str(error.value)
  assert "dataset='imagenet2013'" in message and 'imagenet2012' in message
  assert '\n' not in message and len(message) < 300
  assert message.split('did you mean ')[1].count(' or ') == 2  # The three closest names.


def test_digits_are_prepared_in_the_given_data_dir(tmp_path):
  config = tiny.get_config()
  config.input.data_dir = str(tmp_path / 'digits')
  assert data_sources.num_examples(config.input, 'test', config.num_classes) == 360
  assert len(list((tmp_path / 'digits').rglob('*.png'))) == 1797  # Every digit, in its split.


def test_many_undecodable_files_are_counted_and_the_first_five_named(folder, tmp_path):
  root = tmp_path / 'many_bad'
  shutil.copytree(folder, root)
  for i in range(6):
    (root / 'train' / 'c0' / f'bad{i}.png').write_text('not an image')
  with pytest.raises(ValueError) as error:
    data_sources.num_examples(folder_config(str(root)).input, 'train', NUM_CLASSES)
  message = str(error.value)
  assert '6 file(s)' in message and 'and 1 more' in message
  assert len(re.findall(r'bad\d\.png', message)) == 5


@pytest.mark.parametrize('height, width', [(96, 128), (150, 90)])
def test_eval_image_is_the_central_crop_of_the_short_side_resized_to_size_over_fraction(
  height, width
):
  """ImageNet's eval view, computed with PIL: the short side resized to 64 / 0.875 = 73.1
  pixels (rounded; the long side in proportion, rounded), bicubic with antialiasing, then the
  central 64 x 64. A noise image, so a crop one pixel off or a wrong scale differs everywhere."""
  noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
  encoded = tf.io.encode_png(noise)
  got = preprocessing.eval_image(encoded, 64, 0.875).numpy()
  scale = 64 / 0.875 / min(height, width)
  h, w = round(height * scale), round(width * scale)
  resized = np.asarray(Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC), np.int32)
  top, left = (h - 64) // 2, (w - 64) // 2
  want = resized[top : top + 64, left : left + 64]
  assert got.shape == (64, 64, 3) and got.dtype == np.uint8
  assert np.abs(got.astype(np.int32) - want).mean() < 3  # Two bicubic filters' rounding.
  shifted = resized[top + 1 : top + 65, left : left + 64]
  assert np.abs(got.astype(np.int32) - shifted).mean() > 20  # What a wrong crop would give.


def test_with_mixup_and_cutmix_both_on_each_batch_flips_a_coin_between_them():
  """A black and a bright image: cutmix pastes (only the two values), mixup blends (one value
  between them). Over 40 batches both occur, each near half the time."""
  config = tiny.get_config()
  config.input.mixup_alpha, config.input.cutmix_alpha = 1.0, 1.0
  batch = {
    'image': tf.constant(np.stack([np.zeros((8, 8, 3)), np.full((8, 8, 3), 200)]), tf.uint8),
    'label': tf.constant([0, 1]),
  }
  kinds = []
  for i in range(40):
    image = preprocessing.mix(config.input, batch, tf.constant([7, i], tf.int64), 2)['image']
    values = set(np.unique(image[0].numpy()))
    if values <= {0, 200}:
      kinds.append('cutmix')
    elif len(values) == 1:
      kinds.append('mixup')
  assert len(kinds) >= 36 and 10 <= kinds.count('cutmix') <= 30, kinds


def test_cutmix_pastes_clipped_squares_of_side_root_one_minus_lambda():
  """CutMix (Yun et al. 2019) at alpha 1: lambda ~ U(0, 1), a box of side s sqrt(1 - lambda)
  centred uniformly and clipped to the image. Each paste is a rectangle, square unless clipped,
  and the mean pasted share over 300 batches is the rule's (simulated here with NumPy)."""
  s, draws = 16, 300
  config = tiny.get_config()
  config.input.mixup_alpha, config.input.cutmix_alpha = 0.0, 1.0
  batch = {
    'image': tf.constant(np.stack([np.zeros((s, s, 3)), np.full((s, s, 3), 200)]), tf.uint8),
    'label': tf.constant([0, 1]),
  }
  shares = []
  for i in range(draws):
    mixed = preprocessing.mix(config.input, batch, tf.constant([11, i], tf.int64), 2)
    pasted = mixed['image'][0, :, :, 0].numpy() == 200
    shares.append(pasted.mean())
    np.testing.assert_allclose(mixed['label'][0, 1], pasted.mean(), atol=1e-6)
    if not pasted.any():
      continue
    rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
    assert pasted.sum() == len(rows) * len(cols)  # One filled rectangle.
    if rows[0] > 0 and cols[0] > 0 and rows[-1] < s - 1 and cols[-1] < s - 1:
      assert len(rows) == len(cols), (rows, cols)

  rng = np.random.default_rng(0)
  lam = rng.uniform(size=200_000)
  cut = np.round(s * np.sqrt(1 - lam)).astype(int)
  centre = rng.integers(0, s, (2, lam.size))
  lo, hi = np.maximum(centre - cut // 2, 0), np.minimum(centre + cut - cut // 2, s)
  expected = ((hi - lo).prod(0) / s**2).mean()
  assert abs(np.mean(shares) - expected) < 0.05, (np.mean(shares), expected)


def test_an_image_folder_without_data_dir_is_refused_even_beside_a_split_folder(
  tmp_path, monkeypatch
):
  os.makedirs(tmp_path / 'train' / 'c0')
  monkeypatch.chdir(tmp_path)  # A train/ folder in the working directory is not the dataset.
  config = folder_config('')
  with pytest.raises(FileNotFoundError, match='set --config.input.data_dir'):
    data_sources.num_examples(config.input, 'train', config.num_classes)
