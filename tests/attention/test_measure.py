"""'auto' measured on the device: the mechanism, with injected timings (no timing noise)."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from halonet import sharding
from halonet.attention import AttentionPlan
from halonet.attention import choose
from halonet.attention import measure
from halonet.attention import plain
from halonet.attention.layer import HaloAttention
from halonet.attention.layer import layer_shape
from halonet.models import networks
from halonet.train import loop as train_lib
from halonet.train import step as train_step_lib
from tests import forms

LAYER = measure.Layer(
  batch=2,
  shape=choose.LayerShape(
    height=9,
    width=7,
    channels=8,
    qk_width=8,
    value_width=8,
    num_heads=2,
    block_size=4,
    halo_size=1,
    stride=1,
    mask_window=0,
    dtype='float32',
  ),
)


def _timings(*seconds):
  """A timer that returns `seconds` in the order the forms are timed (plain first)."""
  values = iter(seconds)
  return lambda compiled, args: next(values)


def test_model_layers_are_its_distinct_attention_shapes():
  model = networks.create_model(tiny.get_config())
  layers = measure.model_layers(model, image_size=32, batch=2)
  # 32 px: the stem leaves 8 x 8; stages 2-4 open with a strided block (tiny: one block each),
  # whose attention reads the block's 1x1 reduction to the stage width (8, 16, 16, 32).
  assert [(m.shape.height, m.shape.stride, m.shape.channels, m.shape.qk_width) for m in layers] == [
    (8, 1, 8, 8),
    (8, 2, 16, 16),
    (4, 2, 16, 16),
    (2, 2, 32, 32),
  ]
  assert {m.batch for m in layers} == {2} and len({m.key() for m in layers}) == 4


@pytest.mark.parametrize('seconds, chosen', [((2.0, 1.0), 'rows'), ((1.0, 2.0), 'plain')])
def test_the_fastest_correct_form_is_chosen(seconds, chosen):
  record = measure.measure_layer(LAYER, ('plain', 'rows'), timer=_timings(*seconds))
  assert (record['choice'], record['seconds'], record['skipped']) == (
    chosen,
    dict(zip(('plain', 'rows'), seconds)),
    {},
  )
  assert set(record['errors']) == {'plain', 'rows'}  # Each form's distance from float32.


def test_a_wrong_form_is_rejected_and_a_raising_one_skipped(monkeypatch):
  def wrong(*args, **kwargs):
    return plain.plain_attention(*args, **kwargs) * 1.01

  def broken(*args, **kwargs):
    raise RuntimeError('no kernel for this shape')

  monkeypatch.setitem(choose.IMPLEMENTATIONS, 'wrong', wrong)
  monkeypatch.setitem(choose.IMPLEMENTATIONS, 'broken', broken)
  # 'wrong' would be fastest; only plain and rows are timed.
  record = measure.measure_layer(LAYER, ('wrong', 'broken', 'rows'), timer=_timings(3.0, 2.0))
  assert record['choice'] == 'rows' and set(record['seconds']) == {'plain', 'rows'}
  assert 'wrong disagrees with a float32 evaluation' in record['skipped']['wrong']
  assert 'no kernel for this shape' in record['skipped']['broken']


def test_a_layer_runs_the_form_chosen_for_its_shape(monkeypatch):
  used = forms.record_forms_used(monkeypatch, ('plain', 'rows'))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 7, 8)), jnp.float32)
  params = LAYER.module('plain').init(jax.random.key(1), x)
  want = LAYER.module('plain').apply(params, x)
  used.clear()
  for choice, form in (
    (((LAYER.key(), 'plain'),), 'plain'),
    (((LAYER.key(), 'rows'),), 'rows'),
    ((('another shape', 'plain'),), 'rows'),
  ):  # Unlisted: the CPU rule.
    got = LAYER.module('plain').clone(attention=AttentionPlan('rows', choice)).apply(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert used.pop() == form and not used


def test_choice_is_cached_reused_on_resume_and_skipped_when_explicit(tmp_path, monkeypatch):
  monkeypatch.setenv('HALONET_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HALONET_MEASURE_ATTENTION', '1')
  calls = []

  def fake_measure(layer, candidates):
    calls.append(layer.key())
    return {'choice': 'rows', 'seconds': {'plain': 2.0, 'rows': 1.0}, 'skipped': {}}

  monkeypatch.setattr(measure, 'measure_layer', fake_measure)
  config = tiny.get_config()
  model = networks.create_model(config)
  lines = []
  run = lambda workdir, impl='auto', batch=2: measure.for_run(
    model, impl, 32, batch, str(workdir), say=lines.append
  )
  first = run(tmp_path / 'a')
  assert len(calls) == 4 and len(first) == 4 and {impl for _, impl in first} == {'rows'}
  record = json.loads((tmp_path / 'a' / measure.CHOICE_FILE).read_text())
  assert record['layers'][first[0][0]]['seconds'] == {'plain': 2.0, 'rows': 1.0}
  assert all('-> rows (measured)' in line for line in lines) and len(lines) == 4
  assert run(tmp_path / 'a') == first and len(calls) == 4  # Resumed: the workdir's record.
  assert run(tmp_path / 'b') == first and len(calls) == 4  # Same device kind: the cache.
  assert '(cached)' in lines[-1]
  assert run(tmp_path / 'e', batch=4) == first and len(calls) == 8  # Another batch: measured.
  assert all('batch 4: ' in line and '(measured)' in line for line in lines[-4:])
  assert run(tmp_path / 'c', 'plain') == () and not (tmp_path / 'c').exists()
  monkeypatch.delenv('HALONET_MEASURE_ATTENTION')
  assert run(tmp_path / 'd') == ()  # On CPU 'auto' keeps choose.py's rule unless asked.


def test_training_measures_records_and_uses_the_chosen_forms(tmp_path, monkeypatch, capsys):
  """The whole path in one tiny run (the resume's reuse of the record: the test above)."""
  monkeypatch.setenv('HALONET_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HALONET_MEASURE_ATTENTION', '1')
  config = tiny.get_config()
  config.num_train_steps = 2
  workdir = tmp_path / 'run'
  train_lib.train_and_evaluate(config, str(workdir))
  record = json.loads((workdir / measure.CHOICE_FILE).read_text())
  assert len(record['layers']) == 4
  for layer in record['layers'].values():
    assert set(layer['seconds']) == {'plain', 'rows'} and layer['choice'] in layer['seconds']
  out = capsys.readouterr().out
  assert out.count('(measured)') == 4 and 'measured per layer' in out
  # The saved run is restored with the recorded forms (eval.py, predict.py).
  mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
  state, _, model = train_step_lib.restore_run(config, str(workdir), mesh)
  assert int(state.step) == 2
  assert dict(model.attention.measured) == {k: v['choice'] for k, v in record['layers'].items()}


def test_the_train_and_eval_steps_run_the_measured_forms(tmp_path, monkeypatch):
  """Measured 'plain' where the CPU rule would run 'rows': the train step and the eval step run
  'plain'."""
  monkeypatch.setenv('HALONET_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HALONET_MEASURE_ATTENTION', '1')
  monkeypatch.setattr(
    measure,
    'measure_layer',
    lambda layer, candidates: {'choice': 'plain', 'seconds': {'plain': 1.0}, 'skipped': {}},
  )
  used = forms.record_forms_used(monkeypatch, ('plain', 'rows'))
  measured = measure.for_run

  def measure_then_forget(*args, **kwargs):
    choice = measured(*args, **kwargs)
    used.clear()  # Finding the layers traces the rule's form; only what trains counts.
    return choice

  monkeypatch.setattr(measure, 'for_run', measure_then_forget)
  config = tiny.get_config()
  config.num_train_steps = 1
  config.eval_every_steps = 1
  train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  # After the measurement, every layer call is of the train and eval steps (4 layers each; the
  # initial state's shapes were traced before it and are reused): all in the measured form.
  assert len(used) >= 8 and set(used) == {'plain'}, used


def _fake_measure(calls):
  def fake(layer, candidates):
    calls.append(layer.key())
    return {'choice': 'rows', 'seconds': {'plain': 2.0, 'rows': 1.0}, 'skipped': {}}

  return fake


def test_a_cached_choice_is_not_reused_by_other_code_and_is_checked_before_use(
  tmp_path, monkeypatch
):
  """The cache's key holds the forms' code, the candidates and the mesh; a cached form that no
  longer passes the gate (its code changed under its name) is measured again, said in one line."""
  monkeypatch.setenv('HALONET_CACHE', str(tmp_path / 'cache'))
  calls = []
  monkeypatch.setattr(measure, 'measure_layer', _fake_measure(calls))
  layers = [LAYER]
  lines = []
  measure.choose_layers(layers, 'cpu', say=lines.append, mesh_shape={'data': 8, 'spatial': 1})
  measure.choose_layers(layers, 'cpu', say=lines.append, mesh_shape={'data': 8, 'spatial': 1})
  assert len(calls) == 1 and '(cached)' in lines[-1]
  measure.choose_layers(layers, 'cpu', say=lines.append, mesh_shape={'data': 4, 'spatial': 2})
  assert len(calls) == 2  # Another mesh.
  monkeypatch.setitem(measure.CANDIDATES, 'cpu', ('plain', 'rows', 'dense'))
  measure.choose_layers(layers, 'cpu', say=lines.append, mesh_shape={'data': 4, 'spatial': 2})
  assert len(calls) == 3  # Other candidates.
  monkeypatch.setattr(measure, 'forms_version', lambda: 'other code')
  measure.choose_layers(layers, 'cpu', say=lines.append, mesh_shape={'data': 4, 'spatial': 2})
  assert len(calls) == 4  # Other code.
  # The cached 'rows' now computes something else: checked, refused, measured again.
  monkeypatch.setitem(
    choose.IMPLEMENTATIONS, 'rows', lambda *a, **k: plain.plain_attention(*a, **k) * 1.01
  )
  measure.choose_layers(layers, 'cpu', say=lines.append, mesh_shape={'data': 4, 'spatial': 2})
  assert len(calls) == 5
  assert 'the cached rows fails its check (rows disagrees with a float32' in lines[-2]


def test_a_resume_after_the_forms_changed_measures_again_and_says_so(tmp_path, monkeypatch):
  monkeypatch.setenv('HALONET_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HALONET_MEASURE_ATTENTION', '1')
  calls = []
  monkeypatch.setattr(measure, 'measure_layer', _fake_measure(calls))
  model = networks.create_model(tiny.get_config())
  lines = []
  run = lambda: measure.for_run(model, 'auto', 32, 2, str(tmp_path / 'run'), say=lines.append)
  first = run()
  record = json.loads((tmp_path / 'run' / measure.CHOICE_FILE).read_text())
  assert record['forms_version'] == measure.forms_version()
  assert record['candidates'] == list(measure.CANDIDATES['cpu'])
  assert run() == first and len(calls) == 4  # Resumed with the same code: the record.
  monkeypatch.setattr(measure, 'forms_version', lambda: 'an upgrade')
  lines.clear()
  assert run() == first and len(calls) == 8  # Measured again (the cache is keyed by code too).
  assert lines[0].startswith(f'the attention forms recorded in {measure.CHOICE_FILE} do not hold')
  assert 'its forms_version' in lines[0] and 'measuring again' in lines[0]
  assert (tmp_path / 'run' / 'attention_choice.earlier.json').exists()  # The old one kept.
  assert measure.recorded_choice(str(tmp_path / 'run')) == first


def test_the_layer_measured_is_the_layer_the_model_runs():
  """Each measured layer, rebuilt from its shape alone, gives what the model's own layer gives on
  the input it gets there: masked, strided, with its heads (a field dropped on the way would
  time and check another layer)."""
  config = tiny.get_config()
  config.model.mask_window = 3
  config.model.dtype = 'bfloat16'
  model = networks.create_model(config)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), images)

  def run_recording(variables, images):
    """Each attention layer's (params, input, output), by the key of its shape."""
    seen = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if isinstance(module, HaloAttention) and context.method_name == '__call__':
        shape = layer_shape(module, args[0].shape)
        seen.setdefault(shape.key(), (module.variables['params'], args[0], out))
      return out

    with nn.intercept_methods(record):
      model.apply(variables, images, train=False)
    return seen

  seen = jax.jit(run_recording)(variables, images)
  layers = measure.model_layers(model, image_size=32, batch=2)
  assert {layer.key() for layer in layers} == set(seen) and len(seen) == 4
  for layer in layers:
    assert (layer.shape.mask_window, layer.shape.dtype) == (3, 'bfloat16')
    params, x, want = seen[layer.key()]
    got = jax.jit(layer.module('plain').apply)({'params': params}, x)
    # bfloat16 rounds differently in two compilations; a layer unmasked is off by O(1).
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=0.05)


@pytest.mark.parametrize(
  'rms, scale, within',
  [(0.01, 0.001, True), (0.02, 0.001, True), (0.03, 0.001, False), (0.01, 0.003, False)],
)
def test_errors_are_within_a_limit_only_when_both_figures_are(rms, scale, within):
  """A systematic error (scale) past its limit is refused however small the rms is, and the
  other way round; each limit is inclusive."""
  assert measure.Errors(rms, scale).within(measure.Errors(rms=0.02, scale=0.002)) is within
