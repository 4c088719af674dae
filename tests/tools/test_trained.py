"""Using a trained run: multi-scale features, predict.py, attention maps."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from configs import tiny
from halonet import sharding
from halonet.data import digits
from halonet.data import imagenet_classes
from halonet.data import preprocessing
from halonet.data import sources as data_sources
from halonet.models import halonet as model_lib
from halonet.models import networks
from halonet.tools import trained
from halonet.tools import visualize
from halonet.train import checkpointing
from halonet.train import loop as train_lib
from halonet.train import workdir as workdir_lib
from tests import intercept
from tests import load
from tests import steps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 2-step tiny run: (workdir, its config)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny.get_config()
  config.num_train_steps = 2
  train_lib.train_and_evaluate(config, workdir)
  return workdir, config


def _fresh(config, size):
  images = np.random.default_rng(0).integers(0, 256, (2, size[0], size[1], 3)).astype(np.uint8)
  model = networks.create_model(config)
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return model, variables, images


def test_features_have_strides_4_to_32_at_sizes_b_does_not_divide():
  config = tiny.get_config()  # b = 4; widths (8, 16, 16, 32).
  model, variables, images = _fresh(config, (36, 50))
  maps = jax.jit(lambda v, x: trained.features(config, v, x))(variables, images)
  # ceil(36 / s), ceil(50 / s) for strides 4, 8, 16, 32.
  assert {k: v.shape for k, v in maps.items()} == {
    'stage1': (2, 9, 13, 8),
    'stage2': (2, 5, 7, 16),
    'stage3': (2, 3, 4, 16),
    'stage4': (2, 2, 2, 32),
  }
  # stage4 is what the classifier reads: its pooled features give the model's own logits.
  head = variables['params']['head']
  x = preprocessing.normalize_images(jnp.asarray(images), config.input, jnp.float32)
  np.testing.assert_allclose(
    maps['stage4'].mean(axis=(1, 2)) @ head['kernel'] + head['bias'],
    model.apply(variables, x, train=False),
    rtol=1e-5,
    atol=1e-5,
  )


def test_features_can_be_differentiated_under_jit():
  config = tiny.get_config()
  _, variables, images = _fresh(config, (40, 40))

  def loss(params):  # A dense head on stage 2 sees stages 1-2 only.
    maps = trained.features(config, {**variables, 'params': params}, images)
    return jnp.sum(maps['stage2'] ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  for name, g in grads.items():
    moved = any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(g))
    assert moved == name.startswith(('stem', 'stage1', 'stage2')), name


def test_predict_is_the_softmax_of_the_models_logits_in_padded_batches(monkeypatch):
  """3 images in batches of 2 (the last padded): each row is the softmax of the model's logits
  for that image alone, computed here from the standardised pixels."""
  config = tiny.get_config()
  model, variables, _ = _fresh(config, (32, 32))
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  traces, jit = [], jax.jit

  def traced(f):  # jax.jit, noting the batch shape each time it traces.
    def noted(batch):
      traces.append(batch.shape)
      return f(batch)

    return jit(noted)

  monkeypatch.setattr(trained.jax, 'jit', traced)
  got = trained.predict(config, variables, images, batch_size=2)
  assert traces == [(2, 32, 32, 3)]  # One compilation serves both batches.
  mean, std = 255 * np.asarray(config.input.pixel_mean), 255 * np.asarray(config.input.pixel_std)
  for image, row in zip(images, got, strict=True):
    logits = np.asarray(model.apply(variables, (image[None] - mean) / std, train=False))[0]
    want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)
  assert trained.predict(config, variables, images[:0]).shape == (0, config.num_classes)


def test_load_gives_the_checkpoints_weights_and_refuses_what_the_run_lacks(run, tmp_path):
  workdir, config = run
  loaded_config, variables, step = trained.load(workdir)
  assert step == 2 and loaded_config.to_dict() == config.to_dict()
  manager = checkpointing.create_manager(workdir, 3, read_only=True)
  saved = manager.restore(2, args=ocp.args.StandardRestore())
  manager.close()
  jax.tree.map(np.testing.assert_array_equal, variables['params'], saved['params'])
  jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'], saved['batch_stats'])
  with pytest.raises(ValueError, match=r"weights='best' is not one of \('raw', 'ema'\)"):
    trained.load(workdir, weights='best')
  with pytest.raises(ValueError, match='trained without an EMA'):
    trained.load(workdir, weights='ema')
  other = config.copy_and_resolve_references()
  other.input.crop_fraction = 0.5  # A config given is the one used, not the stored one.
  assert trained.load(workdir, config=other)[0] is other


def test_ema_weights_are_the_checkpoints_ema_parameters(tmp_path):
  config = tiny.get_config()
  config.ema_decay = 0.5
  mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
  state, _ = steps.fresh_state_and_step(config, mesh)
  ema = jax.tree.map(lambda a: np.asarray(a) + 1.0, jax.device_get(state.params))
  state = state.replace(ema_params=jax.device_put(ema, state.params['head']['bias'].sharding))
  manager = checkpointing.create_manager(str(tmp_path), 3)
  checkpointing.save(manager, 5, state)
  checkpointing.finish(manager)
  workdir_lib.check_and_store_config(config, str(tmp_path), False, 0)
  _, variables, step = trained.load(str(tmp_path), weights='ema')
  assert step == 0  # The state's own step: a fresh one saved as checkpoint 5.
  jax.tree.map(np.testing.assert_array_equal, variables['params'], ema)
  _, raw, _ = trained.load(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, raw['params'], jax.device_get(state.params))


def test_images_are_read_from_files_and_folders_and_missing_ones_named(tmp_path):
  config = tiny.get_config()
  folder = _write_images(tmp_path / 'images')
  given = [str(folder / 'seven.jpg'), str(tmp_path / 'missing.png'), str(folder / 'notes.png')]
  files, images, problems = trained.read_images(given, config)
  assert files == [str(folder / 'seven.jpg')] and images.shape == (1, 32, 32, 3)
  assert problems[str(tmp_path / 'missing.png')] == 'no such file or directory'
  assert problems[str(folder / 'notes.png')].startswith('not a decodable image (')
  files, images, problems = trained.read_images([str(tmp_path / 'missing.png')], config)
  assert files == [] and images.shape == (0, 32, 32, 3) and images.dtype == np.uint8


def _write_images(folder):
  """A digit, the same digit grey and RGBA at other sizes, and a text file named .png."""
  root = digits.prepare_digits(digits.DEFAULT_ROOT)
  name = sorted(os.listdir(os.path.join(root, 'test', '7')))[0]
  digit = Image.open(os.path.join(root, 'test', '7', name))
  folder.mkdir()
  digit.convert('RGB').save(folder / 'seven.jpg', quality=95)
  digit.convert('L').resize((20, 20)).save(folder / 'seven_grey.png')
  digit.convert('RGBA').resize((40, 24)).save(folder / 'seven_rgba.png')
  (folder / 'notes.png').write_text('not an image')
  return folder


def test_predict_reports_every_image_and_names_the_bad_file(run, tmp_path):
  workdir, _ = run
  folder = _write_images(tmp_path / 'images')
  output = tmp_path / 'predictions.json'
  output.write_text('kept')  # Never overwritten: the results go to predictions.1.json.
  done = subprocess.run(
    [
      sys.executable,
      'predict.py',
      f'--workdir={workdir}',
      str(folder),
      f'--output={output}',
      '--top_k=3',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
  )
  assert done.returncode == 1, done.stderr[-2000:]
  assert f'ERROR {folder / "notes.png"}: not a decodable image' in done.stderr
  assert 'read_only=True' not in done.stderr and 'read only' not in done.stderr
  assert output.read_text() == 'kept'
  result = json.loads((tmp_path / 'predictions.1.json').read_text())
  assert result['step'] == 2 and list(result['errors']) == [str(folder / 'notes.png')]
  assert [p['file'] for p in result['predictions']] == [
    str(folder / n) for n in ('seven.jpg', 'seven_grey.png', 'seven_rgba.png')
  ]
  for p in result['predictions']:
    probabilities = [t['probability'] for t in p['top']]
    assert len(p['top']) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert all(t['class'] == str(t['label']) for t in p['top'])  # Folder names '0'..'9'.
  # One line per image, its top-k apart by '; ' (class names may hold commas).
  printed = [
    line.split(': ', 1) for line in done.stdout.splitlines() if line.startswith(str(folder))
  ]
  assert [file for file, _ in printed] == [p['file'] for p in result['predictions']]
  for (_, top), p in zip(printed, result['predictions']):
    assert [entry.rsplit(' ', 1)[0] for entry in top.split('; ')] == [t['class'] for t in p['top']]


def test_loading_a_run_from_python_prints_no_orbax_notices(run):
  """A notebook's trained.load (no launch.quiet_logs) gets the run, and no read-only chatter."""
  workdir, _ = run
  code = (
    'import sys; from halonet.tools import trained; '
    'config, variables, step = trained.load(sys.argv[1]); print("step", step)'
  )
  done = subprocess.run(
    [sys.executable, '-c', code, workdir],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == 'step 2'
  assert 'read only' not in done.stderr and 'read_only=True' not in done.stderr, done.stderr


def test_images_are_converted_as_evaluation_converts_them(run, tmp_path):
  _, config = run
  folder = _write_images(tmp_path / 'images')
  files, images, problems = trained.read_images([str(folder)], config)
  assert len(files) == 3 and list(problems) == [str(folder / 'notes.png')]
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  grey = images[files.index(str(folder / 'seven_grey.png'))]
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_attention_maps_are_the_models_weights_and_are_drawn(run, tmp_path):
  workdir, _ = run
  config, variables, _ = trained.load(workdir)
  config.image_size = 48  # No parameter depends on the size: stage 1 is a 12 x 12 map.
  image = np.random.default_rng(0).integers(0, 256, (48, 48, 3)).astype(np.uint8)
  queries = [(0, 0), (24, 20), (47, 47)]
  maps = visualize.query_weights(config, variables, image, 'stage1_block0', queries)
  b, h = 4, 1
  for m in maps:
    assert m.weights.shape == (2, b + 2 * h, b + 2 * h)  # Heads, neighbourhood rows, columns.
    np.testing.assert_allclose(m.weights.data.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  # The corner query's neighbourhood starts h pixels beyond the image: that row and column are
  # padding, masked in the plot and given exactly zero weight by the model.
  corner = maps[0].weights
  assert corner.mask[:, 0, :].all() and corner.mask[:, :, 0].all()
  assert not corner.mask[:, 1:, 1:].any()
  assert (corner.data[:, 0, :] == 0).all() and (corner.data[:, :, 0] == 0).all()
  assert not maps[1].weights.mask.any()  # An inner block sees real pixels only.
  out = tmp_path / 'attention.png'
  figure = visualize.draw(image, maps, 'test')
  figure.savefig(out)
  assert Image.open(out).format == 'PNG'
  # One colour scale for every panel (0 to the largest weight shown) with one colour bar, and
  # one crop: the image plus the corner query's halo, which reaches 1 map px = 4 image px out.
  panels, (colour_bar,) = figure.axes[:6], figure.axes[6:]
  heat = [ax.get_images()[1] for ax in panels]
  assert {im.get_clim() for im in heat} == {(0.0, max(float(m.weights.max()) for m in maps))}
  assert colour_bar.get_ylim() == pytest.approx(heat[0].get_clim())
  assert {(ax.get_xlim(), ax.get_ylim()) for ax in panels} == {((-4.0, 52.0), (52.0, -4.0))}
  # Default queries: the centres of distinct blocks of a 3 x 3 grid (12 px map, b = 4).
  blocks = [
    (y * 12 // 48 // b, x * 12 // 48 // b)
    for y, x in visualize.default_queries(config, 'stage1_block0')
  ]
  assert blocks == [(0, 0), (1, 1), (2, 2)]
  config.image_size = 24  # A 6 px map: 2 x 2 blocks, the last hanging over the edge.
  queries = visualize.default_queries(config, 'stage1_block0')
  assert [(y * 6 // 24 // b, x * 6 // 24 // b) for y, x in queries] == [(0, 0), (1, 1)]
  assert all(0 <= v < 24 for q in queries for v in q)
  config.image_size = 48
  with pytest.raises(ValueError, match=r"--layer='stage9_block0' .* \['stage1_block0'"):
    visualize.query_weights(config, variables, image, 'stage9_block0', queries)
  with pytest.raises(ValueError, match=r'query \(48, 3\) is outside the 48 px image'):
    visualize.query_weights(config, variables, image, 'stage1_block0', [(48, 3)])
  with pytest.raises(ValueError, match='trained without an EMA'):
    trained.load(workdir, weights='ema')


def test_class_names_are_the_folder_names_of_the_dataset():
  config = tiny.get_config()
  config.input.dataset = 'digits/6-9'
  assert data_sources.class_names(config.input) == ['6', '7', '8', '9']
  config.input.dataset, config.input.data_dir = 'image_folder', '/nonexistent/images'
  assert data_sources.class_names(config.input) is None


def test_imagenet_classes_are_named_by_their_lemmas_in_tfds_and_timms_order(tmp_path):
  """The shipped table against the two libraries that number ImageNet-1k (timm's files are read
  without importing timm, which would bring torch into a process with TensorFlow)."""
  tfds_ids = epath.resource_path('tensorflow_datasets') / 'datasets/imagenet2012/labels.txt'
  ids = tfds_ids.read_text().split()
  assert list(imagenet_classes.descriptions()) == ids and len(ids) == 1000
  timm = importlib.util.find_spec('timm')
  if timm is None:
    if os.environ.get('CI') == 'true':
      pytest.fail('timm missing in CI: pip install -r requirements-timm.txt')
  else:
    info = epath.Path(timm.submodule_search_locations[0]) / 'data' / '_info'
    lemmas = dict(
      line.split('\t') for line in (info / 'imagenet_synset_to_lemma.txt').read_text().splitlines()
    )
    assert (info / 'imagenet_synsets.txt').read_text().split() == ids
    assert list(imagenet_classes.descriptions().values()) == [lemmas[i] for i in ids]
  config = tiny.get_config()
  config.input.dataset, config.num_classes = 'imagenet2012', 1000  # TFDS names it without the data.
  config.input.data_dir = str(tmp_path / 'tfds')
  names = data_sources.class_names(config.input)
  assert (len(names), names[0], names[999]) == (
    1000,
    'tench, Tinca tinca',
    'toilet tissue, toilet paper, bathroom tissue',
  )
  for wnid in ('n01443537', 'n99999999'):  # An ImageNet-style folder; an unknown ID stays.
    (tmp_path / 'folder' / 'train' / wnid).mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'folder' / 'train' / wnid / 'a.png')
  config.input.dataset, config.input.data_dir = 'image_folder', str(tmp_path / 'folder')
  assert data_sources.class_names(config.input) == ['goldfish, Carassius auratus', 'n99999999']


def test_attention_layers_and_their_grids_are_the_models_maps():
  """Each attention layer's input side, stride and image px per map px, against the maps the
  model really passes between blocks at a size the strides do not divide."""
  config = tiny.get_config()
  config.model.stage_depths = (1, 2, 1, 1)
  config.model.conv_stages = (3,)
  config.image_size = 36  # 18 after the stem conv, 9 after its pool, then 5, 3, 2.
  layers = ['stage1_block0', 'stage2_block0', 'stage2_block1', 'stage4_block0']
  assert visualize.attention_layers(config) == layers
  net = networks.create_model(config)
  with intercept.module_calls() as called:
    jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), jnp.zeros((1, 36, 36, 3)))
  inputs = {m.name: x.shape[1] for m, x, _ in called if isinstance(m, model_lib.BottleneckBlock)}
  assert [inputs[layer] for layer in layers] == [9, 9, 5, 3]
  for layer, stride in zip(layers, (1, 2, 1, 2)):
    g = visualize.layer_geometry(config, layer)
    assert (g.size, g.stride, g.block_size, g.halo_size) == (inputs[layer], stride, 4, 1)
    assert g.scale == pytest.approx(36 / inputs[layer])
  with pytest.raises(ValueError, match=r"--layer='stage3_block0' is not an attention layer"):
    visualize.layer_geometry(config, 'stage3_block0')


def test_a_strided_layers_weights_are_the_sown_ones_of_the_querys_block():
  """stage2_block0 at 48 px: a 12 px input map, stride 2, so a 6 px grid of queries, 2 per
  block of b = 4 input px, each map px 4 image px. Indices and positions worked by hand."""
  config = tiny.get_config()
  config.image_size = 48
  net = networks.create_model(config)
  variables = net.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)), train=False)
  image = np.random.default_rng(1).integers(0, 256, (48, 48, 3)).astype(np.uint8)
  maps = visualize.query_weights(config, variables, image, 'stage2_block0', [(20, 30), (47, 47)])
  x = preprocessing.normalize_images(jnp.asarray(image[None]), config.input, jnp.float32)
  _, sown = net.apply(variables, x, train=False, mutable=['attention_weights'])
  (sown,) = jax.tree_util.tree_leaves(sown['attention_weights']['stage2_block0'])
  sown = np.asarray(sown[0])  # [blocks y, blocks x, heads, query y, query x, key y, key x].
  # (20, 30) -> output px (2, 3) -> block (1, 1), query (0, 1) in it.
  # Two compilations of the same layer: equal up to float rounding.
  np.testing.assert_allclose(maps[0].weights.data, sown[1, 1, :, 0, 1], rtol=1e-5)
  assert maps[0].query == (18.0, 26.0)  # Input px (4, 6), centre (4.5, 6.5), times 4.
  assert maps[0].block == (16.0, 16.0, 16.0)  # Input px 4-7, times 4.
  assert maps[0].window == (12.0, 12.0, 24.0)  # Input px 3-8 (h = 1 each side).
  assert not maps[0].weights.mask.any()
  # (47, 47) -> output px (5, 5) -> block (2, 2), query (1, 1); its window's last input row and
  # column (12) are past the 12 px map.
  np.testing.assert_allclose(maps[1].weights.data, sown[2, 2, :, 1, 1], rtol=1e-5)
  assert maps[1].query == (42.0, 42.0) and maps[1].window == (28.0, 28.0, 24.0)
  mask = maps[1].weights.mask
  assert mask[:, 5, :].all() and mask[:, :, 5].all() and not mask[:, :5, :5].any()


def test_each_panel_outlines_its_querys_block_and_neighbourhood():
  image = np.zeros((16, 16), np.uint8)
  weights = np.ma.masked_array(np.full((3, 4, 4), 1 / 16), mask=np.zeros((3, 4, 4), bool))
  maps = [
    visualize.QueryWeights((2.5, 3.5), weights, (0.0, 2.0, 2.0), (-1.0, 1.0, 4.0)),
    visualize.QueryWeights((15.5, 8.5), weights * 2, (15.0, 7.0, 2.0), (14.0, 6.0, 4.0)),
  ]
  figure = visualize.draw(image, maps, 'the title')
  panels = figure.axes[:6]
  assert figure.get_suptitle() == 'the title'
  assert [ax.get_title() for ax in panels] == ['head 0', 'head 1', 'head 2', '', '', '']
  assert [ax.get_ylabel() for ax in panels[::3]] == ['query (2, 4)', 'query (16, 8)']
  for ax, m in zip(panels, [maps[0]] * 3 + [maps[1]] * 3):
    window, block = ax.patches
    assert (window.get_xy(), window.get_width(), window.get_height()) == (
      (m.window[1], m.window[0]),
      m.window[2],
      m.window[2],
    )
    assert (window.get_linestyle(), block.get_linestyle()) == ('--', 'solid')
    assert not window.get_fill() and not block.get_fill()
    assert (block.get_xy(), block.get_width()) == ((m.block[1], m.block[0]), m.block[2])
    (marker,) = ax.lines
    assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (m.query[1], m.query[0])
    background, heat = ax.get_images()
    assert background.get_cmap().name == 'gray' and tuple(heat.get_extent()) == (
      m.window[1],
      m.window[1] + m.window[2],
      m.window[0] + m.window[2],
      m.window[0],
    )
    assert heat.get_cmap().name == 'inferno' and heat.get_clim() == (0.0, 2 / 16)
    # The crop: the image and the windows that reach 1 px above it and 2 px below it.
    assert ax.get_xlim() == (0.0, 16.0) and ax.get_ylim() == (18.0, -1.0)


def test_the_attention_map_command_writes_a_new_png_and_refuses_bad_queries(run, tmp_path):
  workdir, _ = run
  image = tmp_path / 'seven.png'
  Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), np.uint8)).save(image)
  out = tmp_path / 'attention.png'
  out.write_text('kept')
  command = [
    sys.executable,
    'visualize.py',
    f'--workdir={workdir}',
    f'--image={image}',
  ]
  bad = subprocess.run(
    [*command, f'--out={out}', '--queries=3;4'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
  )
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].endswith(
    '--queries=\'3;4\' must be "y,x;y,x;..." in pixels'
  ), bad.stderr[-2000:]
  # (40, 44) lies outside the run's 32 px images: only --image_size=48 makes it a query.
  done = subprocess.run(
    [*command, f'--out={out}', '--queries=5,6;40,44', '--image_size=48', '--layer=stage2_block0'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=load.timeout(300),
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert out.read_text() == 'kept'
  written = tmp_path / 'attention.1.png'
  assert done.stdout.strip() == f'wrote {written}'
  # Two query rows of two heads at 110 dpi: (2.2 * 2 + 1) x (2.3 * 2 + 0.6) inches.
  assert Image.open(written).size == (594, 572)
