"""The offline digits folder: complete, balanced, written once."""

import os

from halonet import digits


def _files(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(root) for f in fs}


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
  os.remove(os.path.join(root, 'train', '0', sorted(os.listdir(os.path.join(root, 'train', '0')))[0]))
  digits.prepare_digits(root)
  assert len(_files(root)) == 1797
