"""halonet/paths.py, the one path layer, on a local disk and on a bucket of the local storage
server alike: what each call promises a run (whole files, kept records, no clobbering, moves
that leave a copy, one-line refusals), checked by reading back through the store itself."""

import json
import logging
import os
import stat
import urllib.request
import uuid

import fsspec
import jax
from matplotlib import figure as figure_lib
import pytest

from halonet import errors
from halonet import paths


@pytest.fixture(params=['local', 'bucket'])
def where(request, tmp_path):
  """A fresh folder on a local disk or in the test bucket (not created yet on either)."""
  if request.param == 'local':
    return str(tmp_path / 'here')
  return f'{request.getfixturevalue("storage_server")}/paths_{uuid.uuid4().hex}'


def _read(p) -> bytes:
  return paths.path(p).read_bytes()


def test_names_and_places(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.chdir(tmp_path)
  assert paths.is_url('gs://b/x') and paths.is_url('s3://b') and not paths.is_url('/gs/b')
  assert str(paths.path('~/runs')) == f'{tmp_path}/runs'
  assert str(paths.path('gs://b/~x')) == 'gs://b/~x'
  assert paths.as_string('runs/h7') == f'{tmp_path}/runs/h7'
  assert paths.as_string('~/h7') == f'{tmp_path}/h7'
  assert paths.as_string('gs://b/runs/h7') == 'gs://b/runs/h7'
  assert paths.store_of('gs://b/runs/h7') == 'gs://b'
  assert paths.store_of('gs://b') == 'gs://b'
  assert paths.same_location('gs://b/run/', 'gs://b/run')
  assert not paths.same_location('gs://b/run', 'gs://b/run2')
  assert not paths.same_location('gs://b/run', f'{tmp_path}/run')
  # An object's name is taken as written: no `..` or `//` is collapsed as a disk path's is.
  assert not paths.same_location('gs://b//run', 'gs://b/run')
  assert not paths.same_location('gs://b/x/../run', 'gs://b/run')
  assert not paths.same_location('gs://b/run', 'gs:/b/run')  # A local folder named `gs:`.
  assert not paths.same_location('gs:/b/run', 'gs://b/run')
  (tmp_path / 'run').mkdir()
  (tmp_path / 'link').symlink_to(tmp_path / 'run')
  assert paths.same_location('link', f'{tmp_path}/run')
  assert paths.same_location('~/run', 'run')
  assert not paths.same_location('run', 'other')


def test_files_are_written_whole_read_back_and_records_kept(where):
  target = f'{where}/deep/results.json'
  paths.write_json(target, {'step': 2, 'accuracy': 0.5})
  assert _read(target) == json.dumps({'accuracy': 0.5, 'step': 2}, indent=2).encode()
  assert paths.read_json(target) == {'step': 2, 'accuracy': 0.5}
  paths.write_bytes(target, b'{"step": 3}')
  assert paths.read_text(target) == '{"step": 3}'
  with pytest.raises(FileNotFoundError):
    paths.read_text(f'{where}/deep/none.json')

  log = f'{where}/log.jsonl'
  paths.append_json_lines(log, [{'step': 1}, {'step': 2}])
  paths.write_bytes(log, _read(log).rstrip(b'\n'))  # A file whose last line has no newline.
  paths.append_json_lines(log, [{'b': 1, 'a': 2}])
  paths.append_json_lines(log, [])
  assert _read(log) == b'{"step": 1}\n{"step": 2}\n{"a": 2, "b": 1}\n'
  assert paths.read_json_lines(log) == [{'step': 1}, {'step': 2}, {'a': 2, 'b': 1}]
  assert sorted(os.path.basename(f) for f in paths.files_under(where)) == [
    'log.jsonl',
    'results.json',
  ]  # No temporary file left beside them.


def test_a_local_file_gets_the_permissions_the_umask_gives(tmp_path):
  old = os.umask(0o027)
  try:
    paths.write_bytes(tmp_path / 'a.json', b'{}')
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'a.json').st_mode) == 0o640


def test_only_process_0_writes_records(where, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  paths.write_json(f'{where}/results.json', {'step': 1})
  paths.append_json_lines(f'{where}/log.jsonl', [{'step': 1}])
  assert not paths.path(f'{where}/results.json').exists()
  assert not paths.path(f'{where}/log.jsonl').exists()


def test_unused_paths_number_the_name_before_its_extension(where):
  assert paths.unused_path(f'{where}/sweep.json') == f'{where}/sweep.json'
  paths.write_bytes(f'{where}/sweep.json', b'1')
  assert paths.unused_path(f'{where}/sweep.json') == f'{where}/sweep.1.json'
  paths.write_bytes(f'{where}/sweep.1.json', b'2')
  assert paths.unused_path(f'{where}/sweep.json') == f'{where}/sweep.2.json'
  paths.write_bytes(f'{where}/7.damaged/a', b'3')
  assert paths.unused_path(f'{where}/7.damaged') == f'{where}/7.1.damaged'


def test_files_and_folders_expand_in_the_order_given(where):
  for name in ('b/2.png', 'b/1.png', 'b/c/0.png', 'a.png'):
    paths.write_bytes(f'{where}/{name}', b'x')
  files, missing = paths.expand_files([f'{where}/b', f'{where}/a.png', f'{where}/none.png'])
  assert files == [f'{where}/b/1.png', f'{where}/b/2.png', f'{where}/b/c/0.png', f'{where}/a.png']
  assert missing == {f'{where}/none.png': 'no such file or directory'}


def test_create_new_writes_once_and_never_replaces(where):
  assert paths.create_new(f'{where}/runs/a/lease', b'first') is True
  assert paths.create_new(f'{where}/runs/a/lease', b'second') is False
  assert _read(f'{where}/runs/a/lease') == b'first'


def test_create_new_raises_what_is_not_an_existing_file(storage_server):
  with pytest.raises(OSError) as raised:
    paths.create_new('gs://no-such-bucket/lease', b'x')
  assert not isinstance(raised.value, FileExistsError)


def test_a_created_local_file_gets_the_permissions_the_umask_gives(tmp_path):
  old = os.umask(0o022)
  try:
    assert paths.create_new(tmp_path / 'lease', b'x')
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'lease').st_mode) == 0o644


def test_a_moved_directory_keeps_every_file_and_leaves_nothing_behind(where):
  for name, data in (('7/a', b'1'), ('7/sub/b', b'2')):
    paths.write_bytes(f'{where}/{name}', data)
  inode = None if paths.is_url(where) else os.stat(f'{where}/7/a').st_ino
  paths.move_directory(f'{where}/7', f'{where}/7.damaged')
  assert not paths.path(f'{where}/7').exists()
  assert _read(f'{where}/7.damaged/a') == b'1'
  assert _read(f'{where}/7.damaged/sub/b') == b'2'
  if inode is not None:  # A local disk moves it with one rename, not a copy.
    assert os.stat(f'{where}/7.damaged/a').st_ino == inode
  assert paths.files_under(f'{where}/7.damaged') == [
    f'{where}/7.damaged/a',
    f'{where}/7.damaged/sub/b',
  ]


def test_a_figure_is_saved_as_png(where):
  figure = figure_lib.Figure(figsize=(1, 1))
  figure.add_subplot().plot([0, 1], [1, 0])
  paths.save_figure(figure, f'{where}/plot.png', dpi=20)
  assert _read(f'{where}/plot.png').startswith(b'\x89PNG\r\n\x1a\n')


def test_a_writable_folder_is_made_and_left_as_it_was(where):
  paths.check_writable(f'{where}/run', 'workdir')
  run = paths.path(f'{where}/run')
  assert (list(run.iterdir()) if run.exists() else []) == []  # The probe is gone.
  assert run.is_dir() or paths.is_url(where)  # A bucket has no folders, only objects.
  paths.write_bytes(f'{where}/run/config.json', b'{}')
  paths.check_writable(f'{where}/run', 'workdir')  # A run's own folder, written before.
  assert paths.files_under(f'{where}/run') == [f'{where}/run/config.json']


def test_a_folder_that_cannot_be_written_is_named_in_one_line(
  tmp_path, storage_server, monkeypatch
):
  (tmp_path / 'file').write_text('in the way')
  with pytest.raises(errors.ConfigError) as raised:
    paths.check_writable(tmp_path / 'file' / 'run', 'workdir')
  assert str(raised.value) == (
    f'workdir {tmp_path}/file/run cannot be written: '
    f"[Errno 20] Not a directory: '{tmp_path}/file/run'"
  )
  with pytest.raises(errors.ConfigError, match=r'^init_from gs://no-such-bucket/run cannot be'):
    paths.check_writable('gs://no-such-bucket/run', 'init_from')

  def refused(self, data):
    raise PermissionError()  # A refusal without a word.

  monkeypatch.setattr(type(paths.path(storage_server)), 'write_bytes', refused)
  with pytest.raises(errors.ConfigError) as raised:
    paths.check_writable(f'{storage_server}/silent', 'workdir')
  assert str(raised.value) == f'workdir {storage_server}/silent cannot be written: PermissionError'


def test_a_bucket_listing_shows_what_other_writers_added(storage_server):
  """Orbax's TensorStore and the other hosts write behind gcsfs's back: a listing is read fresh."""
  folder = f'{storage_server}/listed_{uuid.uuid4().hex}'
  paths.write_bytes(f'{folder}/1/a', b'1')
  assert paths.files_under(folder) == [f'{folder}/1/a']
  bucket, name = folder.removeprefix('gs://').split('/', 1)
  upload = urllib.request.Request(
    f'{os.environ["STORAGE_EMULATOR_HOST"]}/upload/storage/v1/b/{bucket}/o'
    f'?uploadType=media&name={name}/2/b',
    data=b'2',
    method='POST',
  )
  urllib.request.urlopen(upload, timeout=30).close()
  assert paths.files_under(folder) == [f'{folder}/1/a', f'{folder}/2/b']
  assert paths.path(f'{folder}/2').is_dir()


def _failing_once(call):
  """`call`, whose first use meets a connection reset, as a store out of reach answers."""
  failed = []

  def once(*args, **kwargs):
    if not failed:
      failed.append(True)
      raise ConnectionResetError('Connection reset by peer')
    return call(*args, **kwargs)

  return once


@pytest.mark.parametrize(
  'call',
  [
    lambda url: paths.write_bytes(f'{url}/x', b'x'),
    lambda url: paths.read_text(f'{url}/x'),
    lambda url: paths.create_new(f'{url}/y', b'y'),
  ],
  ids=['writing', 'reading', 'creating'],
)
def test_each_store_call_is_retried_through_an_outage(
  storage_server, storage_clock, monkeypatch, call, caplog
):
  url = f'{storage_server}/outage_{uuid.uuid4().hex}'
  paths.write_bytes(f'{url}/x', b'x')
  # epath's methods, and the store's conditional upload (fsspec keeps one instance per store).
  for owner, name in (
    (type(paths.path(url)), 'write_bytes'),
    (type(paths.path(url)), 'read_text'),
    (fsspec.core.url_to_fs(url)[0], 'pipe_file'),
  ):
    monkeypatch.setattr(owner, name, _failing_once(getattr(owner, name)))
  with caplog.at_level(logging.WARNING):
    call(url)
  said = [r.getMessage() for r in caplog.records if r.name == 'absl']
  assert len(said) == 2 and said[0].startswith(f'storage {storage_server} unreachable while ')
  assert f' {url}/' in said[0] and said[1].startswith(f'storage {storage_server} reachable again')
