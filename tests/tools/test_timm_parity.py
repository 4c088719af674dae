"""timm's halo networks converted (halonet/tools/convert.py) against timm itself: a randomly
initialised timm model (BatchNorm randomised), saved as safetensors, converted, gives timm's
eval-mode logits and stage outputs; a planted conversion error does not; bad input is named.

PyTorch runs in a subprocess (tests/scripts/timm_reference.py, via tests/torch_side.py).
"""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from halonet import errors
from halonet.models import checks as model_checks
from halonet.models import halonet as model_lib
from halonet.models import networks
from halonet.tools import convert
from halonet.tools import trained
from tests import load
from tests import torch_side

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = list(convert.PRETRAINED)
TOLERANCE = 1e-4  # Of the largest reference magnitude.


@pytest.fixture(scope='module')
def references(tmp_path_factory):
  """Folder with MODEL.safetensors and MODEL.npz for every model (one torch process)."""
  out = tmp_path_factory.mktemp('timm')
  sizes = [f'{name}:{convert.PRETRAINED[name].image_size}' for name in MODELS]
  torch_side.run_script('timm_reference.py', out, *sizes)
  return out


def _close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  error = float(np.abs(got - want).max() / np.abs(want).max())
  assert error <= TOLERANCE, f'relative error {error:.2e}'


def _run(name, variables, images):
  model = networks.create_model(convert.model_config(name))
  apply = jax.jit(functools.partial(model.apply, train=False, mutable=[model_lib.FEATURES]))
  logits, sown = apply(variables, images)
  return logits, {stage: values[0] for stage, values in sown[model_lib.FEATURES].items()}


def _converted(references, name, state=None):
  state = state or convert.read_safetensors(str(references / f'{name}.safetensors'))
  config = convert.model_config(name)
  return convert.convert(name, state, networks.abstract_variables(config))


@pytest.mark.parametrize('name', MODELS)
def test_converted_model_gives_timms_logits_and_stage_features(references, name):
  reference = np.load(references / f'{name}.npz')
  state = convert.read_safetensors(str(references / f'{name}.safetensors'))
  logits, features = _run(name, _converted(references, name, state), reference['images'])
  _close(logits, reference['logits'])
  assert sorted(features) == ['stage1', 'stage2', 'stage3', 'stage4']
  for stage, values in features.items():
    _close(values, reference[stage])
  # The same parameters as timm's model, to the last one.
  timm_params = sum(
    v.size for k, v in state.items() if not k.endswith(('running_mean', 'running_var', 'tracked'))
  )
  assert networks.count_params(convert.model_config(name)) == timm_params


def _swap_first_heads_keys_and_values(kv):  # Heads of 32 key and 32 value channels.
  kv = kv.copy()
  kv[:32], kv[32:64] = kv[32:64], kv[:32].copy()
  return kv


@pytest.mark.parametrize(
  'name, key, plant, output',
  [
    ('halonet26t', 'stages.2.1.self_attn.kv.weight', _swap_first_heads_keys_and_values, 'logits'),
    # The lambda layer's r x r position filters read transposed (rows for columns). Its stage's
    # output shows it: a random deep network's logits barely depend on one layer's positions.
    (
      'lamhalobotnet50ts_256',
      'stages.1.1.self_attn.conv_lambda.weight',
      lambda w: w.swapaxes(2, 3),
      'stage2',
    ),
  ],
)
def test_a_planted_conversion_error_is_caught(references, name, key, plant, output):
  reference = np.load(references / f'{name}.npz')
  state = dict(convert.read_safetensors(str(references / f'{name}.safetensors')))
  state[key] = plant(state[key])
  logits, features = _run(name, _converted(references, name, state), reference['images'])
  with pytest.raises(AssertionError, match='relative error'):
    _close({'logits': logits, **features}[output], reference[output])


def test_wrong_weights_and_names_fail_in_one_line(references):
  with pytest.raises(
    ValueError, match=r"--model='halonet26' is not one of .* did you mean halonet26t"
  ):
    convert.model_config('halonet26')
  state = convert.read_safetensors(str(references / 'halonet26t.safetensors'))
  with pytest.raises(
    ValueError, match=r'stages\.0\.0\.conv2_kxk\.conv\.weight \(64, 64, 3, 3\) converts'
  ):
    convert.convert(
      'eca_halonext26ts',
      state,
      networks.abstract_variables(convert.model_config('eca_halonext26ts')),
    )
  with pytest.raises(
    ValueError,
    match=r"stem\.conv1\.bn\.bias \(24,\) converts to \(24,\), but halonet_h1's .* is \(64,\)",
  ):
    convert.convert(
      'halonet_h1', state, networks.abstract_variables(convert.model_config('halonet_h1'))
    )
  del state['stages.3.1.post_attn.running_var']
  with pytest.raises(ValueError, match='the weights have no stages.3.1.post_attn.running_var'):
    convert.convert(
      'halonet26t', state, networks.abstract_variables(convert.model_config('halonet26t'))
    )


def test_the_converter_and_other_commands_import_side_by_side():
  """Neither halonet.tools.convert nor halonet.tools.visualize claims absl flags (e.g.
  --workdir) on import."""
  code = 'import halonet.tools.convert, halonet.tools.visualize, halonet.train.launch'
  done = subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
  )
  assert done.returncode == 0, done.stderr[-2000:]


def test_an_image_size_timms_layers_cannot_take_is_refused():
  config = convert.model_config('halonet50ts')
  model_checks.validate_config(config)
  config.image_size = 224  # 56 px after the stem, 28 in stage 2: not whole 8 x 8 blocks.
  with pytest.raises(
    ValueError, match='image_size=224 gives stage2_block3 of halonet50ts a 28 x 28'
  ):
    model_checks.validate_config(config)
  config = convert.model_config('haloregnetz_b')  # 7 x 7 blocks, a 3x3 stem of stride 2.
  model_checks.validate_config(config)
  config.image_size = 256
  with pytest.raises(
    ValueError,
    match=r'image_size=256 gives stage3_block3 of haloregnetz_b a 16 x 16 map, not whole 7 x 7 '
    'blocks; use a multiple of 224',
  ):
    model_checks.validate_config(config)
  config.model.arch = 'halonet51'
  with pytest.raises(ValueError, match="model.arch='halonet51' is not one of"):
    model_checks.validate_config(config)


@pytest.mark.slow
def test_the_command_writes_a_run_that_loads_as_any_run(references, tmp_path):
  name = 'haloregnetz_b'  # Its own mean and std, 0.5, stored with the run.
  workdir = tmp_path / 'converted'
  weights = references / f'{name}.safetensors'
  command = [
    sys.executable,
    'convert.py',
    f'--model={name}',
    f'--workdir={workdir}',
  ]
  done = subprocess.run(
    [*command, f'--weights={weights}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=load.timeout(600),
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'{name}: 11,680,072 parameters' in done.stdout
  config, variables, step = trained.load(str(workdir))
  assert (config.model.arch, config.image_size, config.input.crop_fraction, step) == (
    name,
    224,
    0.94,
    0,
  )
  assert tuple(config.input.pixel_mean) == tuple(config.input.pixel_std) == (0.5, 0.5, 0.5)
  reference = np.load(references / f'{name}.npz')
  logits, _ = _run(name, variables, reference['images'])
  _close(logits, reference['logits'])
  again = subprocess.run(
    [*command, f'--weights={weights}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=load.timeout(600),
  )
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1] == (
    f'FATAL --workdir={workdir} already holds a run; convert into a new one'
  )


@pytest.mark.parametrize('content', [None, b'not a safetensors file'])
def test_a_failed_conversion_leaves_no_workdir(tmp_path, content):
  """A missing or unreadable weights file fails in one line before the workdir is made."""
  weights = tmp_path / 'model.safetensors'
  if content is not None:
    weights.write_bytes(content)
  workdir = tmp_path / 'converted'
  with pytest.raises(errors.ConfigError, match='--weights='):
    convert.write_run('halonet26t', str(weights), str(workdir))
  assert not workdir.exists()
