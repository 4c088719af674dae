"""Images/s per core of the train input pipeline, with and without RandAugment, against a bare
tf.data decode-crop-resize of the same JPEGs, measured in one run (round-robin, best of rounds):

    python bench/input_pipeline.py [--images 2048] [--size 256] [--rounds 3] [--out FILE]

The images are written once (ImageNet-like 500 x 375 JPEGs of smooth random colour fields) into
an image folder; each variant then reads the same folder through `input_pipeline.create_split`,
so decode, Inception crop, bicubic resize, flip and RandAugment are what runs in training. The
pipeline starts anew each epoch (~0.5 s with RandAugment); 2,048 images make that a few per cent,
as ImageNet's 1.28M make it nothing (with --images 512 it is a fifth of the time).
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from halonet import defaults  # noqa: E402
from halonet.data import pipeline as input_pipeline  # noqa: E402
from halonet.data.tensorflow_import import tf  # noqa: E402

BATCH = 32


def write_folder(root: str, count: int) -> str:
  """`count` 500 x 375 JPEGs in root/train/<one of 2 classes>/."""
  rng = np.random.default_rng(0)
  for i in range(count):
    folder = os.path.join(root, 'train', f'class{i % 2}')
    os.makedirs(folder, exist_ok=True)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
    noise = rng.normal(0, 8, (375, 500, 3))
    pixels = np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f'{i}.jpg'), quality=90)
  return root


def pipeline(root: str, size: int, count: int, randaugment: bool):
  config = defaults.base_config()
  config.input.dataset, config.input.data_dir = 'image_folder', root
  config.image_size, config.num_classes = size, 2
  config.batch_size, config.input.shuffle_buffer = BATCH, 64
  config.input.randaugment_layers = 2 if randaugment else 0
  config.input.randaugment_magnitude = 10 if randaugment else 0
  return input_pipeline.create_split(
    config.input,
    'train',
    image_size=size,
    num_classes=2,
    seed=config.seed,
    train=True,
    batch_size=BATCH,
    split_size=count,
    process_index=0,
    process_count=1,
  )


def bare(root: str, size: int):
  """Read, decode a random crop window, bilinear resize, batch: the floor of any pipeline."""
  files = tf.data.Dataset.list_files(os.path.join(root, 'train', '*', '*.jpg'), seed=0)

  def load(path):
    data = tf.io.read_file(path)
    window = tf.constant([20, 40, 300, 400])
    image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
    return tf.cast(tf.image.resize(image, [size, size]), tf.uint8)

  ds = files.repeat().map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)
  return iter(input_pipeline.with_options(ds.prefetch(tf.data.AUTOTUNE)).as_numpy_iterator())


def images_per_second(batches, seconds_budget: float) -> float:
  for _ in range(3):  # Warm-up: tf.data's threads and autotuning.
    next(batches)
  start, images = time.perf_counter(), 0
  while time.perf_counter() - start < seconds_budget:
    images += len(_images(next(batches)))
  return images / (time.perf_counter() - start)


def _images(batch):
  return batch['image'] if isinstance(batch, dict) else batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=2048)
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--seconds', type=float, default=8.0, help='per variant and round')
  parser.add_argument(
    '--out', default=os.path.join(os.path.dirname(__file__), 'results_input.json')
  )
  args = parser.parse_args()
  if args.images < BATCH:
    parser.error(f'--images={args.images} is fewer than one batch of {BATCH}')
  cores = os.cpu_count() or 1
  with tempfile.TemporaryDirectory(prefix='halonet_input_bench_') as root:
    write_folder(root, args.images)
    variants = {
      'bare_decode_crop_resize': lambda: bare(root, args.size),
      'pipeline_no_randaugment': lambda: pipeline(root, args.size, args.images, False),
      'pipeline_randaugment_2_10': lambda: pipeline(root, args.size, args.images, True),
    }
    iterators = {name: make() for name, make in variants.items()}
    best = dict.fromkeys(variants, 0.0)
    for _ in range(args.rounds):  # Round-robin: drifts in load hit every variant alike.
      for name, batches in iterators.items():
        best[name] = max(best[name], images_per_second(batches, args.seconds))
  per_core = {name: rate / cores for name, rate in best.items()}
  results = {
    'cores': cores,
    'image_size': args.size,
    'images_per_second_per_core': {k: round(v, 1) for k, v in per_core.items()},
    'randaugment_vs_bare': round(
      best['pipeline_randaugment_2_10'] / best['bare_decode_crop_resize'], 3
    ),
    'no_randaugment_vs_bare': round(
      best['pipeline_no_randaugment'] / best['bare_decode_crop_resize'], 3
    ),
  }
  for name, rate in per_core.items():
    print(f'{name:28s} {rate:8.1f} images/s per core ({rate * cores:.1f} on {cores} cores)')
  print(
    f'RandAugment 2/10 / bare: {results["randaugment_vs_bare"]:.3f}; '
    f'without RandAugment / bare: {results["no_randaugment_vs_bare"]:.3f}'
  )
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
