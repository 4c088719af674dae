"""halonet/train/event_writer.py read back by TensorBoard's own reader: what a run writes to a
bucket is what TensorBoard shows (scalars, texts, hparams, their steps and order, across
uploads), and which writer each kind of workdir and process gets."""

import os
import time
import uuid

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from halonet import paths
from halonet.train import event_writer


def _shown(folder) -> event_accumulator.EventAccumulator:
  """What TensorBoard shows of the events files in `folder`."""
  accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={'tensors': 0})
  accumulator.Reload()
  return accumulator


def _event_files(folder) -> list[str]:
  return sorted(name for name in os.listdir(folder) if name.startswith('events.out.tfevents'))


def _scalars(accumulator, tag: str) -> list[tuple[int, float]]:
  """A scalar's (step, value)s, written as a simple value or (by TensorFlow's writer) a
  tensor: TensorBoard shows both as the same scalar."""
  if tag in accumulator.Tags()['scalars']:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]
  return [
    (e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(tag)
  ]


def _text(accumulator, tag: str) -> list[tuple[int, str]]:
  return [
    (e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
    for e in accumulator.Tensors(tag)
  ]


def test_scalars_texts_and_hparams_read_back_in_order_across_uploads(tmp_path):
  began = time.time()
  writer = event_writer.ObjectStoreEventWriter(str(tmp_path))
  writer.write_hparams({'learning_rate': 0.1, 'batch_size': 8})
  writer.write_scalars(1, {'train/loss': 2.5, 'train/accuracy': np.float32(0.25)})
  writer.write_scalars(2, {'train/loss': 2.0})
  writer.flush()
  writer.flush()  # Nothing new: no empty file.
  writer.write_texts(3, {'note': 'evaluated'})
  writer.write_scalars(3, {'train/loss': 1.5})
  writer.close()

  files = _event_files(tmp_path)
  assert len(files) == 2 and files[0].endswith('.000000') and files[1].endswith('.000001')
  for name in files:  # Each upload is a whole events file TensorBoard can open on its own.
    events = list(event_file_loader.EventFileLoader(str(tmp_path / name)).Load())
    assert events[0].file_version == 'brain.Event:2' and events[0].wall_time >= began
  shown = _shown(tmp_path)
  assert _scalars(shown, 'train/loss') == [(1, 2.5), (2, 2.0), (3, 1.5)]
  times = [e.wall_time for e in shown.Scalars('train/loss')]  # TensorBoard's relative time axis.
  assert began <= times[0] <= times[1] <= times[2] <= time.time()
  assert _scalars(shown, 'train/accuracy') == [(1, 0.25)]
  assert _text(shown, 'note') == [(3, 'evaluated')]
  assert _text(shown, 'hparams') == [(0, 'batch_size: 8\nlearning_rate: 0.1')]
  assert shown.SummaryMetadata('note').plugin_data.plugin_name == 'text'


def test_bucket_metrics_are_uploaded_at_least_every_flush_interval(tmp_path, monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(event_writer.time, 'monotonic', lambda: now[0])
  writer = event_writer.ObjectStoreEventWriter(str(tmp_path))
  writer.write_scalars(1, {'loss': 1.0})
  now[0] += event_writer.FLUSH_EVERY_SECONDS - 1
  writer.write_scalars(2, {'loss': 0.9})
  assert _event_files(tmp_path) == []  # Not yet a minute.
  now[0] += 2
  writer.write_scalars(3, {'loss': 0.8})
  assert len(_event_files(tmp_path)) == 1  # Steps 1-3, uploaded as one whole file.
  now[0] += 1
  writer.write_scalars(4, {'loss': 0.7})
  assert len(_event_files(tmp_path)) == 1  # The interval counts from the last upload.
  now[0] += event_writer.FLUSH_EVERY_SECONDS + 1
  writer.write_scalars(5, {'loss': 0.6})
  writer.close()
  names = _event_files(tmp_path)
  assert len(names) == 2 and names == sorted(names)  # Numbered in the order written.


@pytest.mark.parametrize(
  'write, named',
  [
    (lambda w: w.write_images(1, {'x': np.zeros((1, 2, 2, 3))}), 'images'),
    (lambda w: w.write_histograms(1, {'x': np.zeros(3)}), 'histograms'),
    (lambda w: w.write_summaries(1, {'x': np.zeros(3)}), 'raw summaries'),
    (lambda w: w.write_videos(1, {'x': np.zeros((1, 1, 2, 2, 3))}), 'videos'),
    (lambda w: w.write_audios(1, {'x': np.zeros((1, 4, 1))}, sample_rate=8000), 'audios'),
  ],
)
def test_kinds_a_bucket_does_not_record_are_refused_by_name(tmp_path, write, named):
  writer = event_writer.ObjectStoreEventWriter(str(tmp_path))
  with pytest.raises(NotImplementedError) as raised:
    write(writer)
  assert str(raised.value) == (
    f'{named} are not recorded in a workdir URL ({tmp_path}): only scalars and texts'
  )


def test_each_workdir_and_process_gets_its_writer(storage_server, tmp_path):
  """Process 0 writes events where the run lives: a bucket through whole uploads of scalars and
  texts, a local disk through clu's writer (images too); other processes only log."""
  url = f'{storage_server}/events_{uuid.uuid4().hex}'
  local = str(tmp_path / 'local')
  for workdir in (url, local):
    writer = event_writer.create(workdir, just_logging=False)
    writer.write_scalars(7, {'eval/accuracy': 0.5})
    if workdir == local:
      writer.write_images(7, {'maps': np.zeros((1, 4, 4, 3), np.uint8)})
    else:
      with pytest.raises(NotImplementedError):
        writer.write_images(7, {'maps': np.zeros((1, 4, 4, 3), np.uint8)})
    writer.close()
  uploaded = tmp_path / 'uploaded'
  uploaded.mkdir()
  for name in (p.name for p in paths.path(url).iterdir()):
    (uploaded / name).write_bytes(paths.path(f'{url}/{name}').read_bytes())
  for folder in (uploaded, local):
    assert _scalars(_shown(folder), 'eval/accuracy') == [(7, 0.5)], folder
  assert 'maps' in _shown(local).Tags()['tensors']

  for other in (f'{url}_other_process', str(tmp_path / 'other_process')):
    writer = event_writer.create(other, just_logging=True)
    writer.write_scalars(7, {'eval/accuracy': 0.5})
    writer.close()
    assert not paths.path(other).exists(), other
