"""The exception for bad user input (a config value, the data, the workdir).

train.py and eval.py print it, and FileNotFoundError, in one line without a traceback: the
message names the bad value. Any other exception is a bug here and keeps its traceback.
"""


class ConfigError(ValueError):
  """A value the user chose is unusable; the message names it and what would be accepted."""
