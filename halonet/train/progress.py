"""What a run reports as it trains, through clu's periodic actions: the progress line a person
watches (with clu's steps/s, uptime and time split) and a profiler trace of chosen steps."""

from collections.abc import Callable, Iterator
import contextlib
import os
import shutil
import tempfile
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax

from halonet import console
from halonet import paths


def format_seconds(seconds: float) -> str:
  """H:MM:SS, for an ETA."""
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes // 60}:{minutes % 60:02d}:{seconds:02d}'


class ProgressReport(periodic_actions.ReportProgress):
  """clu's ReportProgress (steps/s and uptime into TensorBoard; in the log the ETA and how the time
  splits between training and each part run `apart`), and every `every_steps` steps and at the
  last one the terminal's line: step, the mean loss and top-1 since the previous line, learning
  rate, images/s and ETA. Images/s and the ETA count training time only.

  `window` returns the mean train metrics since the previous line (loss, lr and those `shown`,
  top1 unless told otherwise); call the report after every step, and once with the first step
  before the loop.
  """

  def __init__(
    self,
    *,
    num_steps: int,
    batch_size: int,
    every_steps: int,
    writer: metric_writers.MetricWriter,
    window: Callable[[], dict[str, float]],
    shown: dict[str, str] | None = None,
  ):
    super().__init__(
      num_train_steps=num_steps, writer=writer, every_steps=every_steps, every_secs=None
    )
    self._num_steps, self._batch_size, self._window = num_steps, batch_size, window
    # The window's metrics printed after the loss, with their formats.
    self._shown = {'top1': '.2f'} if shown is None else shown
    self._time_apart = 0.0
    self._applied_at = 0.0
    self.images_per_sec: float | None = None  # Over the last line's window.

  def __call__(self, step: int, outputs: Any = None) -> bool:
    """After `step` (its outputs, as StepProfile takes them, are not needed here)."""
    del outputs
    return super().__call__(step, self._clock())

  def _clock(self) -> float:
    return time.monotonic() - self._time_apart

  @contextlib.contextmanager
  def apart(self, name: str) -> Iterator[None]:
    """A part of the loop that is not training (evaluation, checkpoints): timed as clu's `timed`
    part `name`, and left out of images/s and the ETA."""
    start = time.monotonic()
    with self.timed(name, wait_jax_async_dispatch=False):
      yield
    self._time_apart += time.monotonic() - start

  def _apply(self, step: int, t: float) -> None:
    # Fetching the window waits for its steps: the rate then counts computed steps, not the
    # dispatched ones that run ahead of the device.
    scalars = self._window()
    self._applied_at = t = self._clock()
    super()._apply(step, t)
    steps_per_sec = (step - self._previous_step) / (t - self._previous_time)
    self.images_per_sec = steps_per_sec * self._batch_size
    scalars['images_per_sec'] = self.images_per_sec
    self._writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()})
    eta = (self._num_steps - step) / steps_per_sec
    console.say(
      f'step {step}/{self._num_steps} loss {scalars["loss"]:.4f} '
      + ''.join(f'{name} {scalars[name]:{spec}} ' for name, spec in self._shown.items())
      + f'lr {scalars["lr"]:.3g} img/s {self.images_per_sec:.1f} ETA {format_seconds(eta)}'
    )

  def _after_apply(self, step: int, t: float) -> None:
    super()._after_apply(step, self._applied_at)  # The next window starts after this fetch.


class StepProfile(periodic_actions.Profile):
  """clu's profiler action over train steps [first, last] (config.profile_steps), for
  TensorBoard's profile plugin in workdir/plugins/profile/.

  The profiler writes into a local folder; when the trace ends every file is copied into the
  workdir through halonet/paths.py, so a trace reaches a workdir URL like every other output.
  Call it after every step with that step's outputs, and once with the first step before the loop.
  """

  def __init__(self, profile_steps: tuple[int, int], workdir: paths.PathLike):
    first, self._last = profile_steps
    self._workdir = workdir
    self._local = tempfile.mkdtemp(prefix='halonet_trace_')
    # clu starts a trace after the step it is called with: after step first - 1.
    super().__init__(
      logdir=self._local,
      num_profile_steps=self._last - first + 1,
      profile_duration_ms=None,
      first_profile=first - 1,
      every_secs=None,
    )

  def __call__(self, step: int, outputs: Any = None) -> bool:
    if step == self._last and self._session_running:
      jax.block_until_ready(outputs)  # The trace then holds the whole last step.
    return super().__call__(step)

  def _end_session(self, url: str | None) -> None:
    super()._end_session(url)
    for folder, _, files in os.walk(self._local):
      for name in files:
        source = os.path.join(folder, name)
        with open(source, 'rb') as f:
          target = paths.path(self._workdir) / os.path.relpath(source, self._local)
          paths.write_bytes(target, f.read())
    logging.warning(
      'profiled steps %d-%d into %s/plugins/profile',
      self._first_profile + 1,
      self._last,
      paths.as_string(self._workdir),
    )

  def close(self) -> None:
    """Ends a trace still running (the run stopped inside it) and removes the local folder."""
    if self._session_running:
      jax.profiler.stop_trace()
      self._end_session(None)
    shutil.rmtree(self._local, ignore_errors=True)
