"""Promises the run-file modules' docstrings make, asserted through the calls a user makes: a `~`
workdir lands under the home folder; a measured choice recorded elsewhere is kept beside the new
one and not used. (Metrics reaching a bucket on time: test_event_writer.py.)"""

import json
import os

import pytest

from configs import tiny
from halonet import paths
from halonet.attention import measure
from halonet.models import networks
from halonet.train import checkpointing
from halonet.train import lease
from halonet.train import workdir as workdir_lib


def test_a_tilde_workdir_lands_under_the_home_folder(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  workdir = '~/runs/tilde'
  paths.check_writable(workdir, 'workdir')
  workdir_lib.check_and_store_config(tiny.get_config(), workdir, False, 0)
  workdir_lib.write_results(workdir, {'step': 0})
  manager = checkpointing.create_manager(workdir, 2)
  checkpointing.save(manager, 0, {'w': [1.0, 2.0]})
  checkpointing.finish(manager)
  lease.acquire(workdir).release()
  home = tmp_path / 'runs' / 'tilde'
  assert sorted(os.listdir(home)) == ['checkpoints', 'config.json', 'results.json']
  assert os.listdir(home / 'checkpoints') == ['0']
  assert not (tmp_path / '~').exists() and not os.path.exists('~')
  assert paths.as_string(workdir) == str(home)


def test_a_choice_recorded_elsewhere_is_kept_beside_and_not_used(tmp_path, monkeypatch):
  """Another kind of device, other forms' code or other candidates: measured again, and each
  earlier record kept under its own name."""
  monkeypatch.setenv('HALONET_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HALONET_MEASURE_ATTENTION', '1')
  monkeypatch.setattr(
    measure,
    'measure_layer',
    lambda layer, candidates: {'choice': 'rows', 'seconds': {'rows': 1.0}, 'skipped': {}},
  )
  model = networks.create_model(tiny.get_config())
  workdir = tmp_path / 'run'
  workdir.mkdir()
  elsewhere = [
    ('device_kind', 'TPU v5 lite'),
    ('forms_version', '0123456789abcdef'),
    ('candidates', ['plain', 'rows', 'dense']),
  ]
  kept = ['attention_choice.earlier.json', 'attention_choice.earlier.1.json']
  kept.append('attention_choice.earlier.2.json')
  for (part, value), earlier in zip(elsewhere, kept):
    record = {
      **measure.measured_with('cpu'),
      part: value,
      'backend': 'cpu',
      'layers': {'some layer': {'choice': 'pallas', 'seconds': {}, 'skipped': {}}},
    }
    (workdir / measure.CHOICE_FILE).write_text(json.dumps(record))
    lines = []
    choice = measure.for_run(model, 'auto', 32, 2, str(workdir), say=lines.append)
    assert {form for _, form in choice} == {'rows'} and len(choice) == 4, part
    assert f'its {part} {value!r}' in lines[0]
    assert json.loads((workdir / earlier).read_text()) == record
    assert json.loads((workdir / measure.CHOICE_FILE).read_text())[part] != value
  assert sorted(p.name for p in workdir.iterdir()) == sorted([measure.CHOICE_FILE, *kept])
  assert measure.recorded_choice(str(workdir)) == choice  # What eval.py's model then runs.
  (workdir / measure.CHOICE_FILE).write_text(json.dumps(record))
  assert measure.recorded_choice(str(workdir)) is None


@pytest.mark.parametrize('name', ['config.json', 'results.json'])
def test_run_files_are_written_whole_or_not_at_all(tmp_path, name):
  """A reader never sees half a file: the write goes to a sibling and is renamed over it."""
  target = tmp_path / name
  target.write_text('{"old": true}')
  seen = []
  real_replace = os.replace

  def replace(source, destination):
    seen.append(json.loads(open(source).read()))  # The new file is whole before it lands.
    assert json.loads(target.read_text()) == {'old': True}  # The old one stands until then.
    return real_replace(source, destination)

  with pytest.MonkeyPatch.context() as m:
    m.setattr(os, 'replace', replace)
    m.setattr(paths.epath.Path, 'replace', lambda self, dst: replace(str(self), str(dst)))
    paths.write_json(target, {'new': True})
  assert seen == [{'new': True}] and json.loads(target.read_text()) == {'new': True}
