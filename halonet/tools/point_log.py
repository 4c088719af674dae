"""A sweep point's own log: what its training prints goes to a file in its sub-workdir, so the
sweep's terminal shows one line per point and the table, and each point's progress stays readable.
"""

from collections.abc import Iterator
import contextlib
import io
import sys

from halonet import paths


@contextlib.contextmanager
def stdout_to(target: paths.PathLike) -> Iterator[None]:
  """Appends what is printed to stdout inside the block to `target` (kept even if the block
  raises). A local file is written line by line (`tail -f` follows it); on an object store the
  log is one object, rewritten whole when the block ends, since objects cannot be appended to."""
  log = paths.path(target)
  log.parent.mkdir(parents=True, exist_ok=True)
  sys.stdout.flush()
  if not paths.is_url(target):
    with open(log, 'a', buffering=1, encoding='utf-8') as f, contextlib.redirect_stdout(f):
      yield
    return
  earlier = log.read_text() if log.exists() else ''
  buffer = io.StringIO()
  try:
    with contextlib.redirect_stdout(buffer):
      yield
  finally:
    paths.write_bytes(target, (earlier + buffer.getvalue()).encode())
