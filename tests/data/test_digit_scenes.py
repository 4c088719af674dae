"""The offline detection scenes: boxes tight around each digit's mask, mask crops that are the
mask over its box, classes of the digit pasted, the same scenes for the same index, and test
scenes drawn only from the digits' test split."""

import numpy as np

from halonet.data import digit_scenes


def test_boxes_masks_and_crops_agree_with_each_other():
  scenes = digit_scenes.batch('train', range(40))
  assert scenes['valid'].any(axis=1).all() and scenes['valid'].sum() > 40
  for i in range(40):
    for g in np.flatnonzero(scenes['valid'][i]):
      mask, (x1, y1, x2, y2) = scenes['masks'][i, g], scenes['boxes'][i, g].astype(int)
      ys, xs = np.nonzero(mask)
      assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
      # The ink is bright where the mask is: the digit is in the image.
      assert scenes['image'][i, ys, xs, 0].mean() > 100
      # The crop, read back over the box at each pixel's centre, is the mask.
      crop = scenes['mask_crops'][i, g]
      rows = ((np.arange(y2 - y1) + 0.5) * 28 / (y2 - y1)).astype(int)
      cols = ((np.arange(x2 - x1) + 0.5) * 28 / (x2 - x1)).astype(int)
      back = crop[rows][:, cols] > 0.5
      assert (back == mask[y1:y2, x1:x2]).mean() > 0.9
    padding = ~scenes['valid'][i]
    assert not scenes['boxes'][i, padding].any() and not scenes['classes'][i, padding].any()
  assert set(np.unique(scenes['classes'][scenes['valid']])) <= set(range(1, 11))
  # Two digits share at most a tenth of the smaller one's pixels.
  for masks, valid in zip(scenes['masks'], scenes['valid']):
    masks = masks[valid]
    for a in range(len(masks)):
      for b in range(a):
        smaller = min(masks[a].sum(), masks[b].sum())
        assert (masks[a] & masks[b]).sum() <= 0.1 * smaller


def test_scenes_are_a_function_of_split_and_index():
  a, b = digit_scenes.scene('test', 3), digit_scenes.scene('test', 3)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(digit_scenes.scene('test', 4)['image'], a['image'])
  assert not np.array_equal(digit_scenes.scene('train', 3)['image'], a['image'])


def test_test_scenes_use_only_the_digits_test_split():
  train_images, _ = digit_scenes._digit_images('train')  # pylint: disable=protected-access
  test_images, _ = digit_scenes._digit_images('test')  # pylint: disable=protected-access
  assert len(train_images) + len(test_images) == 1797 and len(test_images) == 360
  seen = {img.tobytes() for img in train_images}
  assert not any(img.tobytes() in seen for img in test_images)
