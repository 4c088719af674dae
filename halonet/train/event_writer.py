"""TensorBoard metrics of a run: clu's writer on a local disk, whole event files on a bucket.

clu's SummaryWriter writes through TensorFlow's filesystem, which keeps one events file open and
appends to it. For a workdir URL the metrics instead go through halonet/paths.py like every
other file: the records gathered since the last flush become one new events file (a single
upload, so never half written), numbered so that TensorBoard reads them in order. A flush
happens at each checkpoint and evaluation, at close, and a minute after the last one.
"""

from collections.abc import Mapping
import io
import os
import socket
import time
from typing import Any

from clu import metric_writers
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.summary.writer import record_writer

from halonet import paths

FLUSH_EVERY_SECONDS = 60.0


class ObjectStoreEventWriter(metric_writers.MetricWriter):
  """Scalars and texts as TensorBoard events, one complete events file per flush."""

  def __init__(self, logdir: paths.PathLike):
    self._logdir = paths.path(logdir)
    self._prefix = (
      f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}'
    )
    self._events: list[event_pb2.Event] = []
    self._files_written = 0
    self._last_flush = time.monotonic()

  def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    self._events.append(
      event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
      )
    )
    if time.monotonic() - self._last_flush > FLUSH_EVERY_SECONDS:
      self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._add(
      step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    )

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='text')
    )
    self._add(
      step,
      [
        summary_pb2.Summary.Value(tag=k, metadata=metadata, tensor=_string_tensor(v))
        for k, v in texts.items()
      ],
    )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self.write_texts(0, {'hparams': '\n'.join(f'{k}: {v}' for k, v in sorted(hparams.items()))})

  def _unsupported(self, what: str):
    raise NotImplementedError(
      f'{what} are not recorded in a workdir URL ({self._logdir}): only scalars and texts'
    )

  def write_summaries(self, step, values, metadata=None):
    self._unsupported('raw summaries')

  def write_images(self, step, images):
    self._unsupported('images')

  def write_videos(self, step, videos):
    self._unsupported('videos')

  def write_audios(self, step, audios, *, sample_rate):
    self._unsupported('audios')

  def write_histograms(self, step, arrays, num_buckets=None):
    self._unsupported('histograms')

  def flush(self) -> None:
    """Uploads the events gathered since the last flush as one new events file."""
    self._last_flush = time.monotonic()
    if not self._events:
      return
    buffer = io.BytesIO()
    records = record_writer.RecordWriter(buffer)
    for event in [
      event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'),
      *self._events,
    ]:
      records.write(event.SerializeToString())
    paths.write_bytes(self._logdir / f'{self._prefix}.{self._files_written:06d}', buffer.getvalue())
    self._files_written += 1
    self._events.clear()

  def close(self) -> None:
    self.flush()


def _string_tensor(text: str) -> tensor_pb2.TensorProto:
  return tensor_pb2.TensorProto(
    dtype=types_pb2.DT_STRING,
    string_val=[text.encode()],
    tensor_shape=tensor_shape_pb2.TensorShapeProto(),
  )


def create(workdir: paths.PathLike, just_logging: bool) -> metric_writers.MetricWriter:
  """The run's writer: logging only on processes other than 0; events in `workdir`."""
  if just_logging or not paths.is_url(workdir):
    return metric_writers.create_default_writer(
      None if just_logging else paths.as_string(workdir), just_logging=just_logging
    )
  return metric_writers.MultiWriter(
    [metric_writers.LoggingWriter(), ObjectStoreEventWriter(workdir)]
  )
