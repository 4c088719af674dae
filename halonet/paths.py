"""One path layer for everything a run reads or writes: local disks and object stores alike.

Every path a user passes (workdir, init_from, data_dir, sweep and prediction outputs) may be a
URL such as `gs://BUCKET/runs/h7`. They all go through `etils.epath`, which Orbax uses too, so a
checkpoint, config.json and results.json land in the same place on every host.

Object stores have no atomic rename and no append, but a single object write is atomic: a JSON
record is one upload there, and write-then-rename on a local disk (where a crash could otherwise
leave half a file). epath is told (in halonet/__init__.py) to reach object stores through
fsspec (gcsfs for `gs://`) rather than TensorFlow's filesystem: gcsfs follows the standard
credentials and the STORAGE_EMULATOR_HOST setting, so the same code runs against a local
storage server in the tests.
"""

from collections.abc import Callable, Sequence
import io
import itertools
import json
import os
from typing import Any, TypeVar

from etils import epath
import fsspec
import jax

from halonet import errors
from halonet import storage

PathLike = str | os.PathLike
T = TypeVar('T')

# Bucket listings are read fresh: other writers (TensorStore inside Orbax, the other hosts)
# change a bucket behind gcsfs's back, and a cached listing would hide a committed checkpoint.
for _protocol in ('gs', 'gcs'):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault('use_listings_cache', False)


def is_url(path: PathLike) -> bool:
  """Whether `path` names an object store or another filesystem by scheme (gs://, s3://, ...)."""
  return '://' in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path; `~` expanded on local disks, URLs taken as they are."""
  p = os.fspath(p)
  return epath.Path(p if is_url(p) else os.path.expanduser(p))


def as_string(p: PathLike) -> str:
  """The path as a user would type it: `gs://b/x` stays a URL, a local path becomes absolute."""
  p = os.fspath(p)
  return p if is_url(p) else os.path.abspath(os.path.expanduser(p))


def same_location(a: PathLike, b: PathLike) -> bool:
  """Whether two paths name one directory (symlinks resolved on local disks)."""
  a, b = as_string(a), as_string(b)
  if is_url(a) or is_url(b):
    return a.rstrip('/') == b.rstrip('/')
  return os.path.realpath(a) == os.path.realpath(b)


def store_of(p: PathLike) -> str:
  """The bucket a URL names (`gs://b/x` -> `gs://b`), as outage messages name it."""
  scheme, _, rest = as_string(p).partition('://')
  return f'{scheme}://{rest.split("/")[0]}'


def on_store(p: epath.Path, what: str, operation: Callable[[], T]) -> T:
  """`operation` on an object store retried through an outage (halonet/storage.py); local disks
  have no transient failures."""
  if not is_url(p):
    return operation()
  return storage.retried(operation, what=f'{what} {as_string(p)}', where=store_of(p))


def write_bytes(target: PathLike, data: bytes) -> None:
  """Writes `data` so that no reader sees half of it: one upload to an object store; on a local
  disk, a sibling file renamed over the target, with the permissions the user's umask gives."""
  target = path(target)
  if is_url(target):
    on_store(target, 'writing', lambda: target.write_bytes(data))
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'.tmp_{os.getpid()}_{target.name}'
  tmp.write_bytes(data)
  tmp.replace(target)


def write_json(target: PathLike, obj: Any) -> None:
  """`obj` as indented JSON (process 0 only: one copy per run, not one per host)."""
  if jax.process_index() != 0:
    return
  write_bytes(target, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_text(source: PathLike) -> str:
  """The file's text; FileNotFoundError (not retried) if there is none."""
  source = path(source)
  return on_store(source, 'reading', source.read_text)


def read_json(source: PathLike) -> Any:
  return json.loads(read_text(source))


def read_json_lines(source: PathLike) -> list[dict[str, Any]]:
  return [json.loads(line) for line in read_text(source).splitlines() if line.strip()]


def append_json_lines(target: PathLike, records: list[dict[str, Any]]) -> None:
  """Adds one JSON object per line after the records already there (process 0 only).

  Object stores cannot append: the file is read and written again whole, as one object, so
  every earlier record is kept and a crash leaves either the old file or the new one.
  """
  if jax.process_index() != 0:
    return
  try:
    old = read_text(target)
  except FileNotFoundError:
    old = ''
  if old and not old.endswith('\n'):
    old += '\n'
  new = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records)
  write_bytes(target, (old + new).encode())


def unused_path(target: PathLike) -> str:
  """`target`, or the first of NAME.1.EXT, NAME.2.EXT, ... that does not exist yet."""
  target = os.fspath(target)
  stem, ext = os.path.splitext(target)
  candidates = itertools.chain([target], (f'{stem}.{n}{ext}' for n in itertools.count(1)))
  return next(p for p in candidates if not path(p).exists())


def files_under(directory: PathLike) -> list[str]:
  """Every file below `directory`, sorted (epath's walk drops a URL's scheme, so not used)."""
  found = []
  for child in sorted(path(directory).iterdir(), key=str):
    found += files_under(child) if child.is_dir() else [str(child)]
  return found


def expand_files(given: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """(the files named, each folder's files in its place, sorted; {name: why} for names that are
  neither a file nor a folder)."""
  files, missing = [], {}
  for name in given:
    if path(name).is_dir():
      files += files_under(name)
    elif path(name).is_file():
      files.append(name)
    else:
      missing[name] = 'no such file or directory'
  return files, missing


def create_new(target: PathLike, data: bytes) -> bool:
  """Writes `data` to `target` only if no file is there, atomically: True if this call created
  it, False if it existed. On a local disk an exclusive create; on an object store a conditional
  upload (only if no generation of the object exists), which the store decides alone."""
  target = path(target)
  if is_url(target):
    fs, name = fsspec.core.url_to_fs(as_string(target))

    def create() -> bool:
      try:
        fs.pipe_file(name, data, mode='create')
      except (FileExistsError, OSError) as e:  # 412 Precondition Failed: it exists.
        if '412' in str(e) or isinstance(e, FileExistsError) or 'recondition' in str(e):
          return False
        raise
      return True

    return on_store(target, 'creating', create)
  target.parent.mkdir(parents=True, exist_ok=True)
  try:
    descriptor = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(descriptor, 'wb') as f:
    f.write(data)
  return True


def move_directory(source: PathLike, target: PathLike) -> None:
  """Moves a directory and everything in it: one rename on a local disk; on an object store,
  which cannot rename, each file copied, then the originals removed (so a crash leaves a copy,
  never neither)."""
  source, target = path(source), path(target)
  if not is_url(source):
    source.rename(target)
    return
  prefix = as_string(source).rstrip('/') + '/'
  for name in files_under(source):
    relative = as_string(name)[len(prefix) :]
    write_bytes(target / relative, path(name).read_bytes())
  source.rmtree()


def save_figure(figure: Any, target: PathLike, **savefig_kwargs: Any) -> None:
  """A matplotlib Figure as PNG at `target`, through the same layer as every other output."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', **savefig_kwargs)
  write_bytes(target, buffer.getvalue())


def check_writable(directory: PathLike, what: str) -> None:
  """Fails in one line naming `directory` unless this process can create files in it.

  Run before anything compiles, so a missing bucket, missing credentials or a read-only
  location is reported at once rather than at the first checkpoint.
  """
  shown = as_string(directory)
  probe = path(directory) / f'.write_check_{jax.process_index()}_{os.getpid()}'
  try:
    path(directory).mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b'')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  # Each store raises its own kind.
    reason = ' '.join(str(e).split()) or type(e).__name__
    raise errors.ConfigError(f'{what} {shown} cannot be written: {reason[:300]}') from None
