"""Detection input: the canvases against objects drawn by hand (a box is where its pixels went,
under jitter, crops and flips), the batches as a pure function of (seed, position) split across
processes, and COCO's own files read as COCO means them (category ids, crowd regions, images
without objects) with every bad annotation named in one line."""

import json
import logging

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from configs import detection as detection_configs
from halonet import errors
from halonet.detection import data as data_lib

GREY = (124, 116, 104)


def _rectangle(height=60, width=90, box=(20, 10, 50, 40)):
  """An image with one white rectangle (x1, y1, x2, y2) on black, as an example."""
  x1, y1, x2, y2 = box
  image = np.zeros((height, width, 3), np.uint8)
  image[y1:y2, x1:x2] = 255
  mask = np.zeros((1, height, width), bool)
  mask[0, y1:y2, x1:x2] = True
  return {
    'image': image,
    'boxes': np.array([box], np.float32),
    'classes': np.array([3], np.int32),
    'masks': mask,
    'image_id': 7,
  }


def _white_box(canvas):
  ys, xs = np.nonzero(canvas[..., 0] > 200)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_evaluation_resizes_the_longer_side_to_the_canvas_and_keeps_the_way_back():
  out = data_lib.prepared(_rectangle(), 64, 4, GREY)
  height = round(60 * 64 / 90)  # 43 rows; each axis keeps its own exact factor.
  assert tuple(out['image_size']) == (height, 64)
  factors = np.array([64 / 90, height / 60] * 2)
  np.testing.assert_allclose(out['boxes'][0], np.array([20, 10, 50, 40]) * factors, rtol=1e-6)
  np.testing.assert_allclose(out['scale'], factors[:2], rtol=1e-6)
  np.testing.assert_allclose(_white_box(out['image']), out['boxes'][0], atol=1)
  assert (out['image'][height:] == GREY).all()  # The pad is the mean pixel.
  assert list(out['valid']) == [True, False, False, False] and out['classes'][0] == 3
  np.testing.assert_allclose(out['mask_crops'][0], 1.0)  # The rectangle fills its own box.


def test_under_jitter_crops_and_flips_each_box_is_where_its_pixels_went():
  example = _rectangle()
  seen = set()
  for seed in range(60):
    out = data_lib.prepared(
      example,
      64,
      4,
      GREY,
      rng=np.random.default_rng(seed),
      scale_range=(0.5, 4.0),
      flip=True,
    )
    height, width = out['image_size']
    assert (out['image'][height:] == GREY).all() and (out['image'][:, width:] == GREY).all()
    if not out['valid'][0]:  # The window missed the rectangle: nothing may be left of it.
      assert not (out['image'][..., 0] > 200).any()
      seen.add('missed')
      continue
    np.testing.assert_allclose(out['boxes'][0], _white_box(out['image']), atol=1.5)
    assert out['boxes'][0][2] <= width and out['boxes'][0][3] <= height
    # Still the rectangle's own box, however moved (its edges read half the ink at most).
    assert out['mask_crops'][0].mean() > 0.8
    seen.add('smaller' if width < 64 else 'cropped')
  assert seen == {'missed', 'smaller', 'cropped'}


@pytest.mark.parametrize('box', [(0, 0, 1, 64), (0, 0, 64, 1)])
def test_an_object_one_pixel_thin_on_the_edge_keeps_its_box_to_the_pixel(box):
  out = data_lib.prepared(_rectangle(height=64, width=64, box=box), 64, 4, GREY)
  np.testing.assert_array_equal(out['boxes'][0], box)
  assert out['valid'][0]


@pytest.mark.parametrize('box', [(80, 10, 90, 40), (10, 50, 40, 60)])
def test_an_object_the_window_cuts_off_is_left_out(box):
  example = _rectangle(box=box)  # At the right or the bottom edge of a 90 x 60 image.
  outcomes = set()
  for seed in range(20):
    out = data_lib.prepared(
      example, 64, 4, (0, 0, 0), rng=np.random.default_rng(seed), scale_range=(2.0, 2.0)
    )
    visible = (out['image'][..., 0] > 200).any()
    assert out['valid'][0] == visible
    outcomes.add(visible)
  assert outcomes == {True, False}


def test_a_smaller_image_sits_at_the_top_left_of_the_canvas():
  for seed in range(8):
    rng = np.random.default_rng(seed)
    out = data_lib.prepared(_rectangle(), 64, 4, GREY, rng=rng, scale_range=(0.3, 0.6))
    share = np.random.default_rng(seed).uniform(0.3, 0.6)
    size = (round(60 * share * 64 / 90), round(90 * share * 64 / 90))
    assert tuple(out['image_size']) == size
    np.testing.assert_allclose(
      out['boxes'][0], np.array([20, 10, 50, 40]) * out['scale'][[0, 1, 0, 1]]
    )


def _two_rectangles():
  """A bright object on the left, a dim rectangle (not an object) on the right."""
  example = _rectangle(box=(5, 10, 25, 40))
  example['image'][10:40, 60:80] = 128
  return example


def _flipped(out):
  bright, dim = (
    np.nonzero(np.abs(out['image'][..., 0].astype(int) - v) < 20)[1] for v in (255, 128)
  )
  return bright.mean() > dim.mean()


def test_a_flip_mirrors_the_image_its_box_and_its_mask():
  flips = []
  for seed in range(20):
    out = data_lib.prepared(
      _two_rectangles(), 90, 4, (0, 0, 0), rng=np.random.default_rng(seed), flip=True
    )
    flips.append(_flipped(out))
    assert (out['boxes'][0][0] > 45) == flips[-1]
    np.testing.assert_allclose(out['boxes'][0], _white_box(out['image']), atol=1.5)
    assert out['mask_crops'][0].min() > 0.5
  assert 0 < sum(flips) < 20
  for seed in range(20):  # Unless asked for, never.
    out = data_lib.prepared(_two_rectangles(), 90, 4, (0, 0, 0), rng=np.random.default_rng(seed))
    assert not _flipped(out)


def test_crop_mask_reads_a_mask_as_roi_align_reads_a_map():
  """Against scipy's bilinear interpolation at each cell's centre (half-pixel aligned, edges
  clamped)."""
  rng = np.random.default_rng(0)
  mask = rng.random((12, 17)) > 0.5
  for box in [(0, 0, 17, 12), (2.5, 1.25, 9.0, 11.5), (-3.0, -2.0, 20.0, 15.0), (4, 3, 6, 5)]:
    x1, y1, x2, y2 = box
    centres_x = x1 + (np.arange(9) + 0.5) * (x2 - x1) / 9 - 0.5
    centres_y = y1 + (np.arange(9) + 0.5) * (y2 - y1) / 9 - 0.5
    grid_y, grid_x = np.meshgrid(
      np.clip(centres_y, 0, 11), np.clip(centres_x, 0, 16), indexing='ij'
    )
    expected = ndimage.map_coordinates(mask.astype(float), [grid_y, grid_x], order=1)
    np.testing.assert_allclose(data_lib.crop_mask(mask, box, 9), expected, atol=1e-6)


def test_the_pad_is_the_pixel_mean():
  config = detection_configs.get_config('digits')
  assert data_lib.pad_pixel(config.input) == (124, 116, 104)  # ImageNet's mean, 0-255.


def _config(**fields):
  config = detection_configs.get_config('digits')
  config.batch_size = 4
  for name, value in fields.items():
    config[name] = value
  return config


def test_batches_are_a_function_of_the_step_and_processes_share_each_global_batch():
  config = _config()
  images = data_lib.source(config, 'train', train=True)
  run = data_lib.train_batches(config, images, start_step=0)
  first = [next(run) for _ in range(3)]
  resumed = next(data_lib.train_batches(config, images, start_step=2))
  for key in first[2]:
    np.testing.assert_array_equal(resumed[key], first[2][key])
  halves = [
    next(data_lib.train_batches(config, images, start_step=2, process_index=p, process_count=2))
    for p in (0, 1)
  ]
  for key in first[2]:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), first[2][key])
  assert not np.array_equal(first[0]['image'], first[1]['image'])


def test_an_epoch_reads_every_example_once():
  config = _config(seed=3)
  config.batch_size = 50

  class Numbered:
    category_ids = [1]

    def __len__(self):
      return 100

    def example(self, index):
      out = _rectangle()
      return {**out, 'image_id': index}

  batches = data_lib.train_batches(config, Numbered(), start_step=0)
  ids = np.concatenate([next(batches)['image_id'] for _ in range(2)])
  assert sorted(ids) == list(range(100))


def test_training_batches_are_jittered_as_the_config_says():
  config = _config()
  config.batch_size = 16
  config.detection.scale_range = (0.5, 1.5)
  batch = next(
    data_lib.train_batches(config, data_lib.source(config, 'train', train=True), start_step=0)
  )
  assert len({tuple(size) for size in batch['image_size']}) > 1  # Resized by a drawn share.
  config.detection.scale_range = (1.0, 1.0)
  unflipped = next(
    data_lib.train_batches(config, data_lib.source(config, 'train', train=True), start_step=0)
  )
  assert (unflipped['image_size'] == 64).all()
  config.input.random_flip = True
  flipped = next(
    data_lib.train_batches(config, data_lib.source(config, 'train', train=True), start_step=0)
  )
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(unflipped['image'], flipped['image'])]
  assert 0 < sum(mirrored) < len(mirrored)


def test_the_eval_pass_covers_the_split_once_and_marks_its_padding():
  config = _config(eval_batch_size=64)
  images = data_lib.source(config, 'test', train=False)
  batches = list(data_lib.eval_batches(config, images))
  real = np.concatenate([b['real'] for b in batches])
  ids = np.concatenate([b['image_id'] for b in batches])[real]
  assert list(ids) == list(range(len(images)))
  assert (~real).sum() == 64 * len(batches) - len(images)
  halves = [
    list(data_lib.eval_batches(config, images, process_index=p, process_count=2)) for p in (0, 1)
  ]
  for whole, *parts in zip(batches, *halves):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_digit_scenes_are_made_at_the_canvas_size_and_scored_as_made():
  config = _config(image_size=128)
  images = data_lib.source(config, 'test', train=False)
  example = images.example(3)
  assert example['image'].shape == (128, 128, 3) and example['masks'].shape[1:] == (128, 128)
  truth = images.truth()
  assert len(truth['images']) == len(images) == 500
  mine = [a for a in truth['annotations'] if a['image_id'] == 3]
  assert [a['category_id'] for a in mine] == list(example['classes'])
  x1, y1, x2, y2 = example['boxes'][0]
  assert mine[0]['bbox'] == [x1, y1, x2 - x1, y2 - y1]
  with pytest.raises(errors.ConfigError, match="split 'validation' of digit_scenes is not one of"):
    data_lib.source(config, 'validation', train=False)
  config.input.dataset = 'digits'
  with pytest.raises(errors.ConfigError, match="config.input.dataset='digits' is not a detection"):
    data_lib.source(config, 'test', train=False)


# --- COCO's own files ---------------------------------------------------------------------------


def _polygon(x1, y1, x2, y2):
  return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _coco(root, annotations, images=None, categories=(3, 7)):
  """COCO's layout under `root` for split val2017: 3 images of 40 x 60, the given annotations."""
  images = images or [
    {'id': i, 'file_name': f'{i:012d}.jpg', 'height': 40, 'width': 60} for i in (1, 2, 3)
  ]
  (root / 'val2017').mkdir(parents=True, exist_ok=True)
  (root / 'annotations').mkdir(exist_ok=True)
  for image in images:
    pixels = np.zeros((image['height'], image['width'], 3), np.uint8)
    Image.fromarray(pixels).save(root / 'val2017' / image['file_name'])
  content = {
    'images': images,
    'annotations': annotations,
    'categories': [{'id': c, 'name': f'c{c}'} for c in categories],
  }
  (root / 'annotations' / 'instances_val2017.json').write_text(json.dumps(content))


def _annotation(id_, image_id, category, box, crowd=0):
  x1, y1, x2, y2 = box
  return {
    'id': id_,
    'image_id': image_id,
    'category_id': category,
    'bbox': [x1, y1, x2 - x1, y2 - y1],
    'area': (x2 - x1) * (y2 - y1),
    'iscrowd': crowd,
    'segmentation': _polygon(*box),
  }


def _coco_input(root, skip_bad=False, num_classes=2):
  """The config of a run on the COCO files under `root`."""
  config = _config()
  config.input.dataset = 'coco'
  config.input.data_dir = str(root)
  config.input.skip_bad_images = skip_bad
  config.num_classes = num_classes
  return config


def test_coco_files_read_as_coco_means_them(tmp_path):
  _coco(
    tmp_path,
    [
      _annotation(11, 1, 7, (10, 5, 30, 25)),
      _annotation(12, 1, 3, (40, 10, 50, 30)),
      _annotation(13, 2, 3, (0, 0, 60, 40), crowd=1),  # Image 2 has only a crowd region.
    ],
  )
  train = data_lib.source(_coco_input(tmp_path), 'validation', train=True)
  assert len(train) == 1 and train.category_ids == [3, 7]  # Images 2 and 3: nothing to learn.
  example = train.example(0)
  assert example['image_id'] == 1 and list(example['classes']) == [2, 1]  # 7 -> 2, 3 -> 1.
  np.testing.assert_allclose(example['boxes'], [[10, 5, 30, 25], [40, 10, 50, 30]])
  ys, xs = np.nonzero(example['masks'][0])
  assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (10, 5, 30, 25)  # Rasterised.
  scored = data_lib.source(_coco_input(tmp_path), 'validation', train=False)
  assert len(scored) == 3  # Evaluation scores every image, crowd regions in its ground truth.
  assert [a['iscrowd'] for a in scored.truth()['annotations']] == [0, 0, 1]


@pytest.mark.parametrize(
  'bad, named',
  [
    (_annotation(21, 1, 5, (10, 5, 30, 25)), 'annotation 21: category_id 5 is not among'),
    (_annotation(22, 1, 3, (10, 5, 70, 25)), 'annotation 22: bbox [10, 5, 60, 20] lies outside'),
    (_annotation(23, 9, 3, (10, 5, 30, 25)), 'annotation 23: image_id 9 is not among'),
    (_annotation(24, 1, 3, (10, 5, 10, 25)), 'annotation 24: bbox [10, 5, 0, 20] is empty'),
    (_annotation(25, 1, 3, (10, 5, 30, 5)), 'annotation 25: bbox [10, 5, 20, 0] is empty'),
    (_annotation(26, 1, 3, (-1.5, 5, 30, 25)), 'annotation 26: bbox [-1.5, 5, 31.5, 20] lies'),
    (_annotation(27, 1, 3, (10, -2, 30, 25)), 'annotation 27: bbox [10, -2, 20, 27] lies'),
    (_annotation(28, 1, 3, (10, 5, 30, 41.5)), 'annotation 28: bbox [10, 5, 20, 36.5] lies'),
    (_annotation(29, 1, 3, (10, 5, 61.5, 25)), 'annotation 29: bbox [10, 5, 51.5, 20] lies'),
  ],
)
def test_a_bad_annotation_is_named_in_one_line_and_can_be_left_out(tmp_path, caplog, bad, named):
  _coco(tmp_path, [_annotation(11, 1, 7, (10, 5, 30, 25)), bad])
  with pytest.raises(
    errors.ConfigError, match='instances_val2017.json: ' + named.replace('[', r'\[')
  ) as e:
    data_lib.source(_coco_input(tmp_path), 'validation', train=True)
  assert '\n' not in str(e.value) and 'skip_bad_images=True' in str(e.value)
  with caplog.at_level(logging.WARNING):
    kept = data_lib.source(_coco_input(tmp_path, skip_bad=True), 'validation', train=True)
  assert len(kept.example(0)['boxes']) == 1 and named.split(':')[0] in caplog.text


def test_boxes_within_a_pixel_of_their_image_one_pixel_thin_or_without_iscrowd_are_kept(tmp_path):
  rounded = _annotation(41, 1, 3, (-0.5, -1.0, 60.5, 41.0))  # COCO's rounding.
  at_the_bounds = _annotation(43, 1, 3, (-1.0, 0.0, 61.0, 40.0))
  thin = [_annotation(44, 1, 3, (10, 5, 11, 25)), _annotation(45, 1, 3, (20, 5, 30, 6))]
  plain = _annotation(42, 1, 7, (10, 5, 30, 25))
  del plain['iscrowd']
  _coco(tmp_path, [rounded, plain, at_the_bounds, *thin])
  images = data_lib.source(_coco_input(tmp_path), 'validation', train=True)
  assert sorted(images.example(0)['classes']) == [1, 1, 1, 1, 2]


def test_a_segmentation_covering_no_pixel_is_named_when_its_image_is_read(tmp_path, caplog):
  empty = {**_annotation(31, 1, 3, (10, 5, 30, 25)), 'segmentation': [[10, 5, 10, 5, 10, 5]]}
  _coco(tmp_path, [_annotation(11, 1, 7, (10, 5, 30, 25)), empty])
  images = data_lib.source(_coco_input(tmp_path), 'validation', train=True)
  with pytest.raises(errors.ConfigError, match='annotation 31: its segmentation covers no pixel'):
    images.example(0)
  with caplog.at_level(logging.WARNING):
    images = data_lib.source(_coco_input(tmp_path, skip_bad=True), 'validation', train=True)
    assert list(images.example(0)['classes']) == [2]


def test_a_class_count_other_than_the_datas_is_named(tmp_path):
  _coco(tmp_path, [_annotation(11, 1, 3, (10, 5, 30, 25))], categories=(1, 2, 3))
  with pytest.raises(
    errors.ConfigError, match="num_classes=2, but split 'validation' of coco has 3"
  ):
    data_lib.source(_coco_input(tmp_path), 'validation', train=True)


def test_missing_coco_files_are_named(tmp_path):
  with pytest.raises(
    FileNotFoundError,
    match='annotations/instances_train2017.json: config.input.data_dir must hold COCO as',
  ):
    data_lib.source(_coco_input(tmp_path), 'train', train=True)
