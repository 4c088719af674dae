"""The progress line's figures on a clock the test moves: images/s and the ETA over training time
only, measured once the window's steps are fetched; clu's scalars beside ours. The profile's
steps and where its trace lands, with the profiler's start and stop recorded."""

import pathlib

from clu import metric_writers
import pytest

from halonet.train import progress


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


class _Recorder(metric_writers.MetricWriter):
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)

  def write_summaries(self, step, values, metadata=None): ...
  def write_images(self, step, images): ...
  def write_videos(self, step, videos): ...
  def write_audios(self, step, audios, *, sample_rate): ...
  def write_texts(self, step, texts): ...
  def write_histograms(self, step, arrays, num_buckets=None): ...
  def write_hparams(self, hparams): ...
  def flush(self): ...
  def close(self): ...


@pytest.fixture
def clock(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(progress.time, 'monotonic', clock)
  return clock


def test_images_per_second_and_eta_count_computed_training_steps_only(clock, capsys):
  fetch_waits = iter([3.0, 0.0])  # Seconds each window's fetch waits for the device.

  def window():
    clock.now += next(fetch_waits)
    return {'loss': 1.5, 'top1': 40.0, 'grad_norm': 2.0, 'lr': 0.1}

  writer = _Recorder()
  report = progress.ProgressReport(
    num_steps=8, batch_size=16, every_steps=2, writer=writer, window=window
  )
  report(0)
  for step in (1, 2):  # Dispatched 1 s apart, then 3 s waiting for the device.
    clock.now += 1.0
    report(step)
  # 2 steps of 16 images computed in 1 + 1 + 3 = 5 s; 6 steps left at 0.4 steps/s.
  assert capsys.readouterr().out == (
    'step 2/8 loss 1.5000 top1 40.00 lr 0.1 img/s 6.4 ETA 0:00:15\n'
  )
  assert writer.scalars[2]['train/images_per_sec'] == pytest.approx(6.4)
  assert writer.scalars[2]['train/loss'] == 1.5 and writer.scalars[2]['train/lr'] == 0.1
  assert writer.scalars[2]['steps_per_sec'] == pytest.approx(0.4)  # clu's own, the same rate.

  with report.apart('eval'):  # Neither evaluation nor checkpoints count as training time.
    clock.now += 50.0
  for step in (3, 4):
    clock.now += 2.0
    report(step)
  # The window starts after the previous fetch: 2 steps in 4 s of training.
  assert capsys.readouterr().out == (
    'step 4/8 loss 1.5000 top1 40.00 lr 0.1 img/s 8.0 ETA 0:00:08\n'
  )
  assert report.images_per_sec == pytest.approx(8.0)


def test_the_last_step_reports_whatever_the_spacing(clock, capsys):
  lines = []
  report = progress.ProgressReport(
    num_steps=5,
    batch_size=1,
    every_steps=2,
    writer=_Recorder(),
    window=lambda: {'loss': 0.0, 'top1': 0.0, 'grad_norm': 0.0, 'lr': 0.0},
  )
  report(0)
  for step in range(1, 6):
    clock.now += 100.0  # Slow steps: still a line every 2 steps, not every minute.
    report(step)
    lines += capsys.readouterr().out.splitlines()
  assert [line.split()[1] for line in lines] == ['2/5', '4/5', '5/5']


@pytest.mark.parametrize('seconds, text', [(0, '0:00:00'), (59.9, '0:00:59'), (3725, '1:02:05')])
def test_eta_is_hours_minutes_seconds(seconds, text):
  assert progress.format_seconds(seconds) == text


class _FakeProfiler:
  """jax.profiler's start_trace/stop_trace, noting the step each is called after and writing a
  trace file into the log folder as the profiler would."""

  def __init__(self):
    self.step, self.calls = 0, []

  def start_trace(self, logdir):
    self.calls.append(('start', self.step))
    self.logdir = pathlib.Path(logdir) / 'plugins' / 'profile' / 'run'
    self.logdir.mkdir(parents=True)

  def stop_trace(self):
    self.calls.append(('stop', self.step))
    (self.logdir / 'host.xplane.pb').write_bytes(b'trace of steps')


@pytest.fixture
def profiler(monkeypatch):
  fake = _FakeProfiler()
  monkeypatch.setattr(progress.jax.profiler, 'start_trace', fake.start_trace)
  monkeypatch.setattr(progress.jax.profiler, 'stop_trace', fake.stop_trace)
  return fake


@pytest.mark.parametrize('first, last', [(1, 1), (2, 3), (3, 5)])
def test_profile_traces_steps_first_to_last_into_the_workdir(
  first, last, profiler, tmp_path, monkeypatch, clock, caplog
):
  waited = []  # The outputs the profile waits for before it stops.
  monkeypatch.setattr(progress.jax, 'block_until_ready', waited.append)
  profile = progress.StepProfile((first, last), tmp_path)
  local = pathlib.Path(profile._local)  # pylint: disable=protected-access
  profile(0)
  for step in range(1, 7):
    clock.now += 4000.0  # Hours apart: still one trace, of those steps only.
    profiler.step = step  # Step `step` has been dispatched; its outputs are `step`.
    profile(step, step)
  profile.close()
  assert f'profiled steps {first}-{last} into {tmp_path}/plugins/profile' in caplog.text
  # Started once step first - 1 was dispatched, so step `first` runs inside; stopped after `last`.
  assert profiler.calls == [('start', first - 1), ('stop', last)]
  assert waited == [last]
  assert (tmp_path / 'plugins' / 'profile' / 'run' / 'host.xplane.pb').read_bytes() == (
    b'trace of steps'
  )
  assert not local.exists()


def test_a_run_stopped_inside_the_profile_still_keeps_its_trace(profiler, tmp_path):
  profile = progress.StepProfile((2, 9), tmp_path)
  profile(0)
  for step in (1, 2, 3):
    profiler.step = step
    profile(step)
  profile.close()
  assert profiler.calls == [('start', 1), ('stop', 3)]
  assert (tmp_path / 'plugins' / 'profile' / 'run' / 'host.xplane.pb').exists()


def test_a_run_resumed_past_the_first_profiled_step_neither_traces_nor_waits(
  profiler, tmp_path, monkeypatch
):
  waited = []
  monkeypatch.setattr(progress.jax, 'block_until_ready', waited.append)
  profile = progress.StepProfile((2, 3), tmp_path)
  profile(2)  # Resumed at step 2.
  for step in (3, 4):
    profiler.step = step
    profile(step, step)
  profile.close()
  assert profiler.calls == [] and waited == []
  assert not (tmp_path / 'plugins').exists()
