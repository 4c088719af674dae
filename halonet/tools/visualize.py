"""Attention maps of a trained HaloNet, drawn over the image:

  python visualize.py --workdir=W --image=photo.png --out=attention.png \
      [--layer=stage1_block0] [--queries="10,12;40,30"] [--image_size=64]

One row per query pixel, one column per head: the weights that query gives each key of its
block's neighbourhood, over the input image, with the query block (solid) and its neighbourhood,
the block plus the halo (dashed), outlined and the query marked. Keys beyond the image border
are padding: they get no weight and are left clear. The weights are the ones the model computes
(HaloAttention sows them), not a re-implementation.
"""

import dataclasses
import functools
import re
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from matplotlib import patches
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from halonet import attention
from halonet import errors
from halonet import paths
from halonet.data import preprocessing
from halonet.models import halonet as model_lib
from halonet.models import networks
from halonet.rounding import ceil_div
from halonet.tools import trained
from halonet.train import launch  # pylint: disable=g-bad-import-order  # First: quiets TensorFlow.

# Where the default queries go, as fractions of the layer's grid of query blocks: one near a
# corner (its halo is partly padding), one central, one towards the other corner.
DEFAULT_BLOCKS = ((0.15, 0.2), (0.5, 0.5), (0.85, 0.7))


@dataclasses.dataclass
class QueryWeights:
  """One query's attention weights over its neighbourhood, and where things are, in image px."""

  query: tuple[float, float]  # Centre of the query pixel (y, x).
  weights: np.ndarray  # [heads, b+2h, b+2h], padding masked.
  block: tuple[float, float, float]  # Query block (top, left, side).
  window: tuple[float, float, float]  # Neighbourhood (top, left, side).


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
  """Where one attention layer's blocks lie: its input map is `size` px a side, one map pixel
  covering `scale` image pixels; queries sit every `stride` map pixels, `b / stride` per block."""

  block_size: int
  halo_size: int
  stride: int
  size: int
  scale: float

  @property
  def out_size(self) -> int:
    return ceil_div(self.size, self.stride)

  @property
  def per_block(self) -> int:
    return self.block_size // self.stride

  @property
  def blocks_per_side(self) -> int:
    return ceil_div(self.out_size, self.per_block)


def attention_layers(config: ml_collections.ConfigDict) -> list[str]:
  """Names of the blocks whose spatial mixer is halo attention."""
  return [
    f'stage{s}_block{i}'
    for s, depth in enumerate(config.model.stage_depths, 1)
    if s not in config.model.conv_stages
    for i in range(depth)
  ]


def input_size(config: ml_collections.ConfigDict, stage: int, block: int) -> int:
  """Side of the map a block's attention reads (ceil halving: stem, max-pool, stages 2-4)."""
  size = ceil_div(config.image_size, 4)
  for _ in range(2, stage + (block > 0)):
    size = ceil_div(size, 2)
  return size


def layer_geometry(config: ml_collections.ConfigDict, layer: str) -> LayerGeometry:
  """The block grid of `layer` (one of attention_layers) at config.image_size."""
  layers = attention_layers(config)
  if layer not in layers:
    raise errors.ConfigError(
      f'--layer={layer!r} is not an attention layer of this model; choose one of {layers}'
    )
  stage, block = (int(n) for n in re.findall(r'\d+', layer))
  b, h = model_lib.stage_windows(config.model)[stage - 1]
  size = input_size(config, stage, block)
  return LayerGeometry(b, h, 2 if stage > 1 and block == 0 else 1, size, config.image_size / size)


def default_queries(config: ml_collections.ConfigDict, layer: str) -> list[tuple[int, int]]:
  """Image pixels (y, x) at the centres of distinct query blocks of `layer` (DEFAULT_BLOCKS;
  fewer when the grid has fewer blocks)."""
  g = layer_geometry(config, layer)
  blocks = dict.fromkeys(
    (int(fy * g.blocks_per_side), int(fx * g.blocks_per_side)) for fy, fx in DEFAULT_BLOCKS
  )
  # A block's centre query, clipped to the map (the last block may hang over its edge), in px.
  centre = lambda i: min(i * g.per_block + g.per_block // 2, g.out_size - 1)
  pixel = lambda q: int((q + 0.5) * config.image_size / g.out_size)
  return [(pixel(centre(by)), pixel(centre(bx))) for by, bx in blocks]


def query_weights(
  config: ml_collections.ConfigDict,
  variables: dict,
  image: np.ndarray,
  layer: str,
  queries: list[tuple[int, int]],
) -> list[QueryWeights]:
  """The model's own attention weights at `layer` for query pixels (y, x) of a uint8 image."""
  g = layer_geometry(config, layer)
  for y, x in queries:
    if not (0 <= y < config.image_size and 0 <= x < config.image_size):
      raise errors.ConfigError(f'query ({y}, {x}) is outside the {config.image_size} px image')
  model = networks.create_model(config)
  x = preprocessing.normalize_images(jnp.asarray(image[None]), config.input, jnp.dtype(model.dtype))
  apply = functools.partial(model.apply, train=False, mutable=[attention.ATTENTION_WEIGHTS])
  _, sown = jax.jit(apply)(variables, x)
  (weights,) = [
    leaf
    for name, tree in sown[attention.ATTENTION_WEIGHTS].items()
    if name == layer
    for leaf in _leaves(tree)
  ]
  # The sown tuple's array, image 0: [nbh, nbw, heads, qy, qx, ky, kx].
  weights = np.asarray(weights[0][0], np.float32)
  b, h, scale = g.block_size, g.halo_size, g.scale
  keys = np.arange(b + 2 * h)
  result = []
  for y, x in queries:
    oy, ox = y * g.out_size // config.image_size, x * g.out_size // config.image_size
    (by, qy), (bx, qx) = divmod(oy, g.per_block), divmod(ox, g.per_block)
    w = weights[by, bx, :, qy, qx]
    inside = (
      ((by * b - h + keys)[:, None] >= 0)
      & ((by * b - h + keys)[:, None] < g.size)
      & ((bx * b - h + keys)[None, :] >= 0)
      & ((bx * b - h + keys)[None, :] < g.size)
    )
    result.append(
      QueryWeights(
        query=((oy * g.stride + 0.5) * scale, (ox * g.stride + 0.5) * scale),
        weights=np.ma.masked_array(w, mask=np.broadcast_to(~inside, w.shape)),
        block=(by * b * scale, bx * b * scale, b * scale),
        window=((by * b - h) * scale, (bx * b - h) * scale, (b + 2 * h) * scale),
      )
    )
  return result


def _leaves(tree):
  """The sown weights under a block (one attention layer), wherever Flax nested them."""
  if isinstance(tree, dict):
    return [leaf for value in tree.values() for leaf in _leaves(value)]
  return [tree]


def draw(image: np.ndarray, maps: list[QueryWeights], title: str) -> Figure:
  """A grid, query per row and head per column, of weights over the image. Every panel shares
  one colour scale (0 to the largest weight shown, one colour bar) and one crop (the image plus
  every neighbourhood that reaches past its border), so heads and queries compare directly."""
  heads = maps[0].weights.shape[0]
  figure = Figure(figsize=(2.2 * heads + 1.0, 2.3 * len(maps) + 0.6), layout='constrained')
  axes = figure.subplots(len(maps), heads, squeeze=False)
  side = image.shape[0]
  top_most = min([0.0] + [m.window[0] for m in maps])
  left_most = min([0.0] + [m.window[1] for m in maps])
  bottom_most = max([float(side)] + [m.window[0] + m.window[2] for m in maps])
  right_most = max([float(side)] + [m.window[1] + m.window[2] for m in maps])
  vmax = max(float(m.weights.max()) for m in maps)
  shown = None
  for row, m in enumerate(maps):
    for head in range(heads):
      ax = axes[row, head]
      ax.imshow(image, extent=(0, side, side, 0), cmap='gray' if image.ndim == 2 else None)
      top, left, size = m.window
      shown = ax.imshow(
        m.weights[head],
        extent=(left, left + size, top + size, top),
        cmap='inferno',
        alpha=0.75,
        vmin=0.0,
        vmax=vmax,
        interpolation='nearest',
      )
      ax.add_patch(patches.Rectangle((left, top), size, size, fill=False, ls='--', ec='cyan'))
      btop, bleft, bside = m.block
      ax.add_patch(patches.Rectangle((bleft, btop), bside, bside, fill=False, ec='lime'))
      ax.plot(m.query[1], m.query[0], 'x', color='cyan', ms=7, mew=2)
      ax.set_xlim(left_most, right_most)
      ax.set_ylim(bottom_most, top_most)
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(f'head {head}', fontsize=9)
      if head == 0:
        ax.set_ylabel(f'query ({m.query[0]:.0f}, {m.query[1]:.0f})', fontsize=9)
  figure.colorbar(shown, ax=axes, shrink=0.6, label='attention weight')
  figure.suptitle(title, fontsize=10)
  return figure


def _parse_queries(text: str) -> list[tuple[int, int]]:
  try:
    queries = [tuple(int(v) for v in pair.split(',')) for pair in text.split(';')]
  except ValueError:
    queries = []
  if not queries or any(len(q) != 2 for q in queries):
    raise errors.ConfigError(f'--queries={text!r} must be "y,x;y,x;..." in pixels')
  return queries


def define_flags() -> None:
  """The command's flags, defined only when it runs: modules that the library and other
  commands import must not claim flag names (--workdir) in absl's global registry."""
  flags.DEFINE_string('workdir', None, "The training run's workdir.")
  flags.DEFINE_string('image', None, 'An image file (any size, mode and format).')
  flags.DEFINE_string('out', 'attention.png', 'PNG written (never overwritten: .1.png, ...).')
  flags.DEFINE_string('layer', 'stage1_block0', 'Attention layer: stage<S>_block<I>.')
  flags.DEFINE_string(
    'queries',
    '',
    '"y,x;y,x" query pixels of the (resized) image; default: '
    'the centres of 3 query blocks spread over it.',
  )
  flags.DEFINE_integer('image_size', None, "Resize to this size (default: the run's).")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_enum('weights', 'raw', trained.WEIGHTS, 'Raw parameters, or their EMA if kept.')
  flags.mark_flags_as_required(['workdir', 'image'])


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  launch.quiet_logs()
  with launch.one_line_errors():
    config, variables, step = trained.load(FLAGS.workdir, FLAGS.step, FLAGS.weights)
    if FLAGS.image_size:
      config.image_size = FLAGS.image_size  # No parameter depends on it.
    _, images, problems = trained.read_images([FLAGS.image], config)
    if problems:
      raise errors.ConfigError(f'--image={FLAGS.image}: {problems[FLAGS.image]}')
    queries = (
      _parse_queries(FLAGS.queries) if FLAGS.queries else default_queries(config, FLAGS.layer)
    )
    maps = query_weights(config, variables, images[0], FLAGS.layer, queries)
    g = layer_geometry(config, FLAGS.layer)
    cell = f'{g.scale:g} x {g.scale:g}'
    title = (
      f'{FLAGS.layer} (b={g.block_size}, h={g.halo_size}), step {step}, '
      f'{config.image_size} px image\n'
      f"one heat cell: one pixel of the layer's input map (stride {g.scale:g}), "
      f'{cell} image px\nsolid: query block, dashed: its neighbourhood (block + halo)'
    )
    out = paths.unused_path(FLAGS.out)
    paths.save_figure(draw(images[0], maps, title), out, dpi=110)
    print(f'wrote {out}', file=sys.stdout)
