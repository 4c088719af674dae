"""TensorFlow (the input pipeline's, CPU only), imported without its C++ start-up notices.

TensorFlow's native libraries print two lines each as they load, before TF_CPP_MIN_LOG_LEVEL or
absl's C++ log is set up to filter them ("All log messages before absl::InitializeLog() ..." and
"oneDNN custom operations are on ..."), so every entry point opened with four lines of noise. The
import runs with file descriptor 2 pointed at a temporary file; whatever else it wrote there is
passed on to stderr unchanged, so a real problem still shows.
"""

from collections.abc import Iterator
import contextlib
import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

NOTICES = (
  'All log messages before absl::InitializeLog() is called are written to STDERR',
  'oneDNN custom operations are on.',
)


@contextlib.contextmanager
def _native_stderr_filtered() -> Iterator[None]:
  """Holds what native code writes to fd 2 in the block; replays all but the NOTICES lines."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      kept = [
        line
        for line in held.read().decode(errors='replace').splitlines(keepends=True)
        if not any(notice in line for notice in NOTICES)
      ]
      sys.stderr.write(''.join(kept))
      sys.stderr.flush()


with _native_stderr_filtered():
  import tensorflow as tf

__all__ = ['tf']
