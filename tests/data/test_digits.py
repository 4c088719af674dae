"""The offline digits folder: complete, balanced, written once."""

import os

import pytest

from halonet import errors
from halonet.data import digits


def _files(root):
  return {
    os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
    for d, _, fs in os.walk(root)
    for f in fs
  }


def test_prepare_digits_writes_all_images_once(tmp_path):
  root = digits.prepare_digits(str(tmp_path / 'digits'))
  files = _files(root)
  assert len(files) == 1797
  for split, size in (('train', 1437), ('test', 360)):
    classes = sorted(os.listdir(os.path.join(root, split)))
    assert classes == [str(c) for c in range(10)]
    assert sum(len(os.listdir(os.path.join(root, split, c))) for c in classes) == size
  assert os.listdir(tmp_path) == ['digits']  # The temp dir was renamed, nothing left over.
  assert digits.prepare_digits(root) == root
  assert _files(root) == files  # Second call rewrote nothing.


def test_prepare_digits_replaces_an_incomplete_folder(tmp_path):
  root = digits.prepare_digits(str(tmp_path / 'digits'))
  os.remove(
    os.path.join(root, 'train', '0', sorted(os.listdir(os.path.join(root, 'train', '0')))[0])
  )
  digits.prepare_digits(root)
  assert len(_files(root)) == 1797


def test_digit_subsets_hold_only_their_classes_and_never_replace_another_folder(tmp_path):
  assert digits.classes_of('digits/5-9') == (5, 6, 7, 8, 9)
  assert digits.classes_of('digits') == tuple(range(10))
  assert digits.classes_of('digits/7-2') is None and digits.classes_of('mnist') is None
  root = digits.prepare_digits(str(tmp_path / 'high'), (5, 6, 7, 8, 9))
  assert sorted(os.listdir(os.path.join(root, 'train'))) == ['5', '6', '7', '8', '9']
  # The full set's split, restricted: the same files as those classes in 'digits'.
  full = digits.prepare_digits(str(tmp_path / 'all'))
  for split in ('train', 'test'):
    for c in '56789':
      assert sorted(os.listdir(os.path.join(root, split, c))) == sorted(
        os.listdir(os.path.join(full, split, c))
      )
  files = _files(full)
  with pytest.raises(errors.ConfigError, match=r"holds the classes \['0', '1'"):
    digits.prepare_digits(full, (0, 1, 2, 3, 4))
  assert _files(full) == files
