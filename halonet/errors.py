"""The exception for bad user input (a config value, the data, the workdir).

train.py and eval.py print it, DiskFull, StorageOutage, PeerTimeout and FileNotFoundError in one
line without a traceback: the message names the bad value. Any other exception is a bug here and
keeps its traceback.
"""

import errno


class ConfigError(ValueError):
  """A value the user chose is unusable; the message names it and what would be accepted."""


class DiskFull(OSError):
  """The disk filled while the run was writing; the message says what is safe on disk."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)

  def __str__(self) -> str:
    return self.strerror


class StorageOutage(RuntimeError):
  """The object store stayed unreachable past config.storage_outage_minutes; the message names
  it, the operation and (from the run) the last committed checkpoint."""


class PeerTimeout(RuntimeError):
  """Another process of a multi-host run did not arrive in time; the message says at what."""


def is_disk_full(error: BaseException) -> bool:
  """ENOSPC as Python raises it, or as TensorStore reports it inside Orbax's errors."""
  return getattr(error, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(error)
