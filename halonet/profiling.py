"""A jax.profiler trace of chosen train steps, for TensorBoard's profile plugin."""

import os
import shutil
import tempfile

from absl import logging
import jax

from halonet import paths


class StepTrace:
  """Traces steps [first, last] of a run (config.profile_steps = (first, last); () = off) into
  workdir/plugins/profile/, where `tensorboard --logdir=workdir` finds it.

  The profiler writes to a local folder first, then every file is copied into the workdir
  through halonet/paths.py, so a trace reaches a workdir URL like every other output.
  """

  def __init__(self, profile_steps: tuple[int, ...], workdir: paths.PathLike):
    self.steps = tuple(profile_steps)
    self.workdir = workdir
    self.local = None

  def before(self, step: int) -> None:
    """Call before running `step` (counting from 1)."""
    if self.steps and step == self.steps[0]:
      self.local = tempfile.mkdtemp(prefix='halonet_trace_')
      jax.profiler.start_trace(self.local)

  def after(self, step: int, outputs) -> None:
    """Call after dispatching `step`; waits for its outputs so the trace holds the whole step."""
    if self.local and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.stop()
      logging.warning(
        'profiled steps %d-%d into %s/plugins/profile', *self.steps, paths.as_string(self.workdir)
      )

  def stop(self) -> None:
    if not self.local:
      return
    jax.profiler.stop_trace()
    for folder, _, files in os.walk(self.local):
      for name in files:
        source = os.path.join(folder, name)
        with open(source, 'rb') as f:
          paths.write_bytes(
            paths.path(self.workdir) / os.path.relpath(source, self.local), f.read()
          )
    shutil.rmtree(self.local, ignore_errors=True)
    self.local = None
