"""Mask R-CNN on this machine: our train step and inference against torchvision's, and what local
attention costs over the conv backbone (the paper: 540 vs 446 ms, b = 8 against R50 + SE).

    python bench/detection.py      # 512 px, batch 2; writes bench/results_detection.json
    python bench/detection.py --tiny --out /tmp/d.json   # toy shapes: the smoke test

Both detectors are ResNet-50 FPN Mask R-CNNs with random weights, the backbone's BatchNorm frozen,
torchvision's head sizes (ours are the same by default: 2000/1000 proposals, 512 sampled RoIs,
1024-wide box head, 256-wide mask head), 80 classes, on the same images and objects (offline
digit scenes at --size px) with SGD momentum. The attention rows are configs/detection.py's
r50_se and r50_se_b8 (inference). Every ratio compares timings of one run, taken round-robin,
best of --repeats.
"""

import argparse
import json
import os
import platform
import sys

_parser = argparse.ArgumentParser(
  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
_parser.add_argument('--tiny', action='store_true', help='toy shapes: a smoke test')
_parser.add_argument('--size', type=int, default=512, help='image side (a multiple of 64)')
_parser.add_argument('--batch', type=int, default=2, help='images per step')
_parser.add_argument('--repeats', type=int, default=3, help='timed runs per measurement')
_parser.add_argument(
  '--out', default=os.path.join(os.path.dirname(__file__), 'results_detection.json')
)
ARGS = _parser.parse_args()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch and torchvision load before jax (bench/README.md: triton's module after them segfaults).
import torch  # noqa: E402
from torchvision.models import resnet  # noqa: E402
from torchvision.models.detection import backbone_utils  # noqa: E402
from torchvision.models.detection import mask_rcnn  # noqa: E402
from torchvision.ops import misc  # noqa: E402

# isort: split
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench import common  # noqa: E402
from configs import detection as detection_configs  # noqa: E402
from halonet import sharding  # noqa: E402
from halonet.data import digit_scenes  # noqa: E402
from halonet.detection import data as data_lib  # noqa: E402
from halonet.detection import evaluation  # noqa: E402
from halonet.detection import train_step as step_lib  # noqa: E402
from halonet.train import step as train_step_lib  # noqa: E402

NUM_CLASSES = 80


def _config(row: str, **model):
  config = detection_configs.get_config(row)
  config.model.update(model)
  config.image_size, config.batch_size, config.eval_batch_size = ARGS.size, ARGS.batch, ARGS.batch
  config.model.dtype = 'float32'
  if ARGS.tiny:
    config.model.stage_depths = (1, 1, 1, 1)
    config.detection.rpn_pre_nms_top_n = (200, 100)
    config.detection.rpn_post_nms_top_n = (200, 100)
    config.detection.roi_batch_per_image = 64
  return config


def _scenes():
  """The benchmark's images and objects, as our batch and as torchvision's inputs."""
  scenes = [digit_scenes.scene('train', i, size=ARGS.size) for i in range(ARGS.batch)]
  config = _config('r50_se')
  ours = [
    data_lib.prepared(
      {
        **{k: s[k][s['valid']] for k in ('boxes', 'classes', 'masks')},
        'image': s['image'],
        'image_id': i,
      },
      ARGS.size,
      config.detection.max_objects,
      data_lib.pad_pixel(config.input),
    )
    for i, s in enumerate(scenes)
  ]
  batch = {k: np.stack([o[k] for o in ours]) for k in step_lib.TRAIN_BATCH_KEYS}
  images = [torch.from_numpy(s['image']).permute(2, 0, 1).float() / 255 for s in scenes]
  targets = [
    {
      'boxes': torch.from_numpy(s['boxes'][s['valid']]),
      'labels': torch.from_numpy(s['classes'][s['valid']].astype(np.int64)),
      'masks': torch.from_numpy(s['masks'][s['valid']].astype(np.uint8)),
    }
    for s in scenes
  ]
  return batch, images, targets


def _torchvision(images, targets):
  """(train step, inference) of torchvision's Mask R-CNN, ResNet-50 FPN, BatchNorm frozen."""
  torch.manual_seed(0)
  backbone = resnet.resnet50(norm_layer=misc.FrozenBatchNorm2d)
  model = mask_rcnn.MaskRCNN(
    backbone_utils._resnet_fpn_extractor(backbone, 5),  # pylint: disable=protected-access
    num_classes=NUM_CLASSES + 1,
    min_size=ARGS.size,
    max_size=ARGS.size,
    # Ours keeps max_detections whatever they score (static shapes): so does torchvision here,
    # as it does in practice for a trained model on COCO, not none, as random weights score.
    box_score_thresh=0.0,
    **(
      dict(
        rpn_pre_nms_top_n_train=200,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_train=200,
        rpn_post_nms_top_n_test=100,
        box_batch_size_per_image=64,
      )
      if ARGS.tiny
      else {}
    ),
  )
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

  def train_step():
    model.train()
    losses = model(images, targets)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()

  def infer():
    model.eval()
    with torch.no_grad():
      model(images)

  return train_step, infer


def _ours(batch, row: str, **model):
  """(train step, inference) of ours for configs/detection.py's `row` (its model fields
  overridden by `model`), compiled."""
  config = _config(row, **model)
  config.num_classes = NUM_CLASSES
  mesh = sharding.create_mesh((1, 1), jax.devices()[:1])
  detector = evaluation.detector_of(config)
  tx = optax.sgd(1e-3, momentum=0.9)
  init, abstract = step_lib.abstract_state(config, detector, tx, mesh)
  state = jax.jit(init)(jax.random.key(0))
  step = step_lib.make_train_step(
    config, detector, tx, optax.constant_schedule(1e-3), mesh, train_step_lib.shardings_of(abstract)
  )
  device_batch = sharding.shard_batch(batch, mesh)
  infer, _ = evaluation.compile_infer(config, detector, mesh, abstract)
  infer_batch = {k: device_batch[k] for k in step_lib.INFER_BATCH_KEYS}
  holder = {'state': state}

  def train_step():
    holder['state'], metrics = step(holder['state'], device_batch)
    jax.block_until_ready(metrics)

  def inference():
    jax.block_until_ready(infer(holder['state'].params, holder['state'].batch_stats, infer_batch))

  return train_step, inference


def main() -> None:
  batch, images, targets = _scenes()
  torch_train, torch_infer = _torchvision(images, targets)
  # torchvision's ResNet-50 has no SE: ours without it is the same network.
  ours_train, ours_infer = _ours(batch, 'r50_se', use_se=False)
  timed = common.seconds_of(
    common.best_of(
      {
        'torchvision_train': torch_train,
        'ours_train': ours_train,
        'torchvision_infer': torch_infer,
        'ours_infer': ours_infer,
      },
      ARGS.repeats,
    )
  )
  rows = ('r50_se', 'r50_se_b8')
  attention = common.seconds_of(
    common.best_of({row: _ours(batch, row)[1] for row in rows}, ARGS.repeats)
  )
  results = {
    'machine': {
      'platform': platform.platform(),
      'cpus': os.cpu_count(),
      'jax': jax.__version__,
      'torch': torch.__version__,
      'torch_threads': torch.get_num_threads(),
    },
    'size': ARGS.size,
    'batch': ARGS.batch,
    'tiny': ARGS.tiny,
    'seconds': {**timed, **{f'infer_{k}': v for k, v in attention.items()}},
    'train_step_speedup_vs_torchvision': timed['torchvision_train'] / timed['ours_train'],
    'inference_speedup_vs_torchvision': timed['torchvision_infer'] / timed['ours_infer'],
    'ms_per_image': {k: 1000 * v / ARGS.batch for k, v in attention.items()},
    'attention_inference_cost': attention['r50_se_b8'] / attention['r50_se'],
    'paper_attention_inference_cost': 540 / 446,
  }
  with open(ARGS.out, 'w') as f:
    json.dump(results, f, indent=2)
  for key in (
    'train_step_speedup_vs_torchvision',
    'inference_speedup_vs_torchvision',
    'attention_inference_cost',
    'paper_attention_inference_cost',
  ):
    print(f'{key}: {results[key]:.2f}')
  print(f'ms per image: {results["ms_per_image"]}; written to {ARGS.out}')


if __name__ == '__main__':
  main()
