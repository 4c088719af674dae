"""The files a run keeps (halonet/train/workdir.py), on a local folder: what a resume may change,
the history of replaced configs, what an eval refuses, and results read back as written.
tests/test_object_store.py runs the same code against a bucket."""

import json

import pytest

from configs import tiny
from halonet import errors
from halonet.train import workdir as workdir_lib


def _stored(tmp_path, name='config.json'):
  return json.loads((tmp_path / name).read_text())


def test_first_start_records_the_config_and_an_unchanged_restart_writes_nothing(tmp_path):
  config = tiny.get_config()
  workdir_lib.check_and_store_config(config, tmp_path, allow_change=False, step=0)
  assert _stored(tmp_path)['batch_size'] == config.batch_size
  workdir_lib.check_and_store_config(config, tmp_path, allow_change=False, step=5)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']


@pytest.mark.parametrize(
  'field, value, refused',
  [
    ('num_train_steps', 9, False),
    ('mesh_shape', (2, 1), False),
    ('eval_batch_size', 8, False),
    ('batch_size', 8, True),
    ('optimizer.learning_rate', 0.5, True),
    ('model.block_size', 2, True),
    ('input.data_dir', '/elsewhere', False),
    ('input.eval_splits', ('train',), False),
    ('input.dataset', 'digits/0-5', True),
    ('input.randaugment_magnitude', 5, True),
  ],
)
def test_a_restart_may_change_how_a_run_is_run_but_not_what_it_is(tmp_path, field, value, refused):
  config = tiny.get_config()
  workdir_lib.check_and_store_config(config, tmp_path, allow_change=False, step=0)
  config.update_from_flattened_dict({field: value})
  if refused:
    with pytest.raises(errors.ConfigError, match=f'fields: {field}\\); pass --allow_config_change'):
      workdir_lib.check_and_store_config(config, tmp_path, allow_change=False, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']
    return
  workdir_lib.check_and_store_config(config, tmp_path, allow_change=False, step=3)
  assert workdir_lib.changed_fields(_stored(tmp_path, 'config.step3.json'), _stored(tmp_path)) == [
    field
  ]


def test_every_replaced_config_is_kept(tmp_path):
  """Allowed changes at the same step land in config.step4.json, then .1, .2: none is lost."""
  config = tiny.get_config()
  workdir_lib.check_and_store_config(config, tmp_path, allow_change=False, step=0)
  for batch in (8, 4, 2):
    config.batch_size = batch
    workdir_lib.check_and_store_config(config, tmp_path, allow_change=True, step=4)
  kept = [_stored(tmp_path, n)['batch_size'] for n in ('config.step4.json', 'config.step4.1.json')]
  assert kept + [_stored(tmp_path, 'config.step4.2.json')['batch_size']] == [16, 8, 4]
  assert _stored(tmp_path)['batch_size'] == 2


def test_changed_fields_are_dotted_and_include_added_and_removed_ones():
  old = {'a': 1, 'model': {'b': 2, 'c': 3}}
  new = {'a': 1, 'model': {'b': 5, 'd': 4}}
  assert workdir_lib.changed_fields(old, new) == ['model.b', 'model.c', 'model.d']
  assert workdir_lib.changed_fields(old, old) == []


def test_eval_refuses_only_what_the_checkpoint_depends_on():
  fields = ['model.widths', 'num_classes', 'eval_batch_size', 'image_size', 'model']
  assert workdir_lib.refused_for_eval(fields) == ['model.widths', 'num_classes', 'model']
  assert workdir_lib.refused_on_resume(['mesh_shape', 'model.widths', 'profile_steps']) == [
    'model.widths'
  ]
  # A group holds its own dotted fields, not others that share its first letters.
  assert workdir_lib.refused_for_eval(['model_ema', 'num_classes_seen', 'modeled.x']) == []
  assert workdir_lib.refused_on_resume(['evals_weighted', 'mesh_shape_x', 'evals.0']) == [
    'evals_weighted',
    'mesh_shape_x',
  ]


def test_stored_config_loads_back_with_tuples_and_new_fields_defaulted(tmp_path):
  config = tiny.get_config()
  workdir_lib.check_and_store_config(config, tmp_path, allow_change=False, step=0)
  stored = _stored(tmp_path)
  del stored['model']['shortcut']  # As a run written before the field existed.
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  loaded = workdir_lib.load_config(tmp_path)
  assert loaded.model.widths == tuple(config.model.widths)
  assert loaded.model.shortcut == 'conv' and loaded.batch_size == config.batch_size


def _flat_layout(config_json: dict) -> dict:
  """A config.json as runs wrote it before the input fields moved into config.input."""
  return {**{k: v for k, v in config_json.items() if k != 'input'}, **config_json['input']}


def test_a_run_stored_before_the_input_group_loads_and_resumes_unchanged(tmp_path):
  config = tiny.get_config()
  config.input.crop_fraction, config.input.data_dir = 0.9, '/data'
  old = _flat_layout(workdir_lib.as_json(config))
  assert old['crop_fraction'] == 0.9 and 'input' not in old
  (tmp_path / 'config.json').write_text(json.dumps(old))
  loaded = workdir_lib.load_config(tmp_path)
  assert loaded.input.crop_fraction == 0.9 and loaded.input.dataset == 'digits'
  assert loaded.input.eval_splits == ('test',) and loaded.input.data_dir == '/data'
  workdir_lib.check_and_store_config(config, tmp_path, allow_change=False, step=4)
  assert _stored(tmp_path) == old  # The same run: nothing refused, nothing rewritten.
  config.input.dataset = 'digits/0-5'
  with pytest.raises(errors.ConfigError, match=r'fields: input.dataset\)'):
    workdir_lib.check_and_store_config(config, tmp_path, allow_change=False, step=4)


def test_missing_config_is_named(tmp_path):
  assert workdir_lib.stored_config(tmp_path) is None
  with pytest.raises(FileNotFoundError, match=f'no {tmp_path}/config.json: pass --config'):
    workdir_lib.load_config(tmp_path)


def test_results_and_records_read_back_as_written(tmp_path):
  assert workdir_lib.read_results(tmp_path) == {}
  workdir_lib.write_results(tmp_path, {'test': {'top1': 0.5}})
  assert workdir_lib.read_results(tmp_path) == {'test': {'top1': 0.5}}
  workdir_lib.append_eval_records(tmp_path, [{'step': 1}])
  workdir_lib.append_eval_records(tmp_path, [{'step': 2}, {'step': 3}])
  lines = (tmp_path / 'eval_records.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [1, 2, 3]


def test_fields_added_since_a_run_was_stored_count_as_their_defaults(tmp_path):
  """A config.json written before config.task and config.detection existed resumes unchanged:
  the missing fields are read as their defaults, as load_config reads them."""
  config = tiny.get_config()
  stored = workdir_lib.as_json(config)
  del stored['task'], stored['detection']
  assert workdir_lib.changed_fields(stored, workdir_lib.as_json(config)) == []
  config.task = 'detection'
  assert workdir_lib.changed_fields(stored, workdir_lib.as_json(config)) == ['task']
