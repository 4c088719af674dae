"""A jax.profiler trace of chosen train steps, for TensorBoard's profile plugin."""

import jax
from absl import logging


class StepTrace:
  """Traces steps [first, last] of a run (config.profile_steps = (first, last); () = off) into
  workdir/plugins/profile/, where `tensorboard --logdir=workdir` finds it."""

  def __init__(self, profile_steps: tuple[int, ...], workdir: str):
    self.steps = tuple(profile_steps)
    self.workdir = workdir
    self.active = False

  def before(self, step: int) -> None:
    """Call before running `step` (counting from 1)."""
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.workdir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Call after dispatching `step`; waits for its outputs so the trace holds the whole step."""
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.stop()
      logging.warning('profiled steps %d-%d into %s/plugins/profile', *self.steps, self.workdir)

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
