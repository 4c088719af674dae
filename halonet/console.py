"""The lines a person watching a run reads: printed by process 0 only, flushed at once, so a pod
prints each line once and the terminal stays free of library chatter (that goes to the log)."""

import jax


def say(message: str) -> None:
  """Prints `message` on process 0's stdout."""
  if jax.process_index() == 0:
    print(message, flush=True)
