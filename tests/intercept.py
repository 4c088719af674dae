"""Every module call inside a block of code: (module, first argument, output), in call order."""

from collections.abc import Iterator
import contextlib

import flax.linen as nn


@contextlib.contextmanager
def module_calls() -> Iterator[list[tuple[nn.Module, object, object]]]:
  """The list each module's __call__ appends to while the block runs (init, apply, eval_shape)."""
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      calls.append((context.module, args[0] if args else None, out))
    return out

  with nn.intercept_methods(record):
    yield calls
