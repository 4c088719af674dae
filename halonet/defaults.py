"""The fields every config has, with their defaults (H1 on ImageNet) and what each one means.

Each field is declared once, as (default, meaning): the default builds the config, the meaning is
what `--help` prints beside it. configs/halonet.py builds each named config from these; a run's
stored config.json is read back onto them (halonet/train/workdir.py), so the library needs no
config file to load a trained run.
"""

from typing import Any

import ml_collections

# config.model: the architecture knobs a HaloNet sweep turns (defaults: H1); the fields of HaloNet.
MODEL_FIELDS: dict[str, tuple[Any, str]] = dict(
  block_size=(8, 'b: query block side.'),
  halo_size=(3, 'h: halo width around each block.'),
  block_sizes=((), 'Per-stage overrides of b and h (4 entries each); empty = use the two above.'),
  halo_sizes=((), 'per-stage h (4 entries); empty = halo_size.'),
  value_ratio=(1.0, 'r_v: attention value/output width = w * r_v.'),
  bottleneck_ratio=(1.0, 'r_b: block output width = w * r_b.'),
  widths=((64, 128, 256, 512), 'w of each stage: attention query/key width and bottleneck width.'),
  stage_depths=((3, 3, 10, 3), '(3, 3, l_3, 3).'),
  num_heads=((4, 8, 8, 8), 'attention heads per stage.'),
  final_width=(0, 'd_f: final 1x1 conv before pooling; 0 = none.'),
  conv_stages=((), 'stages (1-4) that use a 3x3 conv instead of attention.'),
  mixers=(
    (),
    "The spatial mixer of each stage (4 names, halonet/models/mixers): 'halo', 'conv', 'sasa', "
    "'global' (BoTNet), 'sk', 'split' (ResNeSt), 'condconv' or 'dynamic'; empty = 'halo', or "
    "'conv' in conv_stages.",
  ),
  channel_attention=(
    (),
    "Channel attention after each stage's blocks (4 names, halonet/models/channel_attention): "
    "'', 'se', 'eca', 'cbam', 'ge_minus', 'ge' or 'ge_plus'; empty = 'se' with use_se, else "
    'none.',
  ),
  stage_attention=('', "'bam': BAM after stages 1-3; '' = none."),
  stem=(
    'conv',
    "'conv' (7x7/2 conv, 3x3/2 max-pool), 'sasa' (SASA's attention stem), or the 'deep' (3x3 "
    "convs of 32, 32, 64) and 'tiered' (24, 32, 64) stems of timm's 'd'/'t' ResNets.",
  ),
  shortcut=(
    'conv',
    "Where a block downsamples: 'conv' (strided 1x1 conv) or 'avg_down' (2x2 average pool, "
    "then the 1x1 conv, as timm's 'd'/'t' ResNets).",
  ),
  sasa_window=(7, "k: the window side of 'sasa' mixers (odd)."),
  sk_kernels=((3, 5), 'kernel of each Selective Kernel path (odd; 5 = 3x3 dilated by 2).'),
  radix=(2, "Split Attention's splits per channel."),
  num_experts=(4, "kernels mixed by 'condconv' and 'dynamic' mixers."),
  mask_window=(0, 'k > 0 restricts each query to a k x k window (masked attention).'),
  attention_impl=(
    'auto',
    "'plain' (loop-free, batch-parallel), 'rows' (row loop, hand-written backward: the CPU "
    "fast path), 'pallas' (fused TPU kernels), 'pallas_gpu' (fused GPU kernels; both "
    "interpreted on CPU), 'dense' (jax.nn.dot_product_attention per block) or 'auto': measured "
    'per layer on TPU/GPU, rows on CPU (halonet/attention/choose.py).',
  ),
  remat=(False, "recompute each block's activations in the backward pass."),
  use_se=(False, "squeeze-excitation in every block (channel_attention='se' per stage)."),
  activation=('relu', "'relu' or 'silu'."),
  stochastic_depth_rate=(0.0, 'drop-path rate of the last block (linear from 0).'),
  dropout_rate=(0.0, 'dropout before the classifier.'),
  dtype=(
    'auto',
    "compute dtype; params, optimizer state and softmax stay float32. 'auto': bfloat16 on "
    'TPU/GPU, float32 on CPU.',
  ),
  arch=(
    '',
    "One of timm's halo networks by name (halonet/models/timm/byob.py ARCHS, e.g. "
    "'halonet26t', for its converted weights: python convert.py); '' = the HaloNet the fields "
    'above build.',
  ),
)

# config.input: what the input pipeline reads (halonet/data/pipeline.py): the data, its splits,
# the preprocessing and the augmentation.
INPUT_FIELDS: dict[str, tuple[Any, str]] = dict(
  dataset=(
    'imagenet2012',
    "A TFDS name ('imagenet2012', 'imagenet_v2/matched-frequency', ...), 'image_folder' (class "
    "per sub-folder under data_dir) or 'digits' (offline quick-start); for detection 'coco' "
    "(COCO's own files under data_dir) or 'digit_scenes' (offline).",
  ),
  data_dir=('', 'TFDS data_dir, or the root of an image folder.'),
  manual_dir=('', 'where the ImageNet tars were downloaded by hand.'),
  train_split=('train', 'split trained on.'),
  eval_splits=(('validation',), 'splits evaluated (raw and EMA params).'),
  crop_fraction=(0.875, 'eval: resize to s / crop_fraction, centre crop s.'),
  pixel_mean=((0.485, 0.456, 0.406), 'RGB mean (0-1 units) subtracted before the model.'),
  pixel_std=((0.229, 0.224, 0.225), "RGB std (0-1 units) divided by: timm's, per model."),
  crop_area_range=((0.08, 1.0), "train: Inception crop's share of the image area."),
  random_flip=(True, 'train: horizontal flips (off for data such as digits).'),
  randaugment_layers=(2, 'RandAugment ops per image; 0 = off.'),
  randaugment_magnitude=(10, 'RandAugment magnitude (0-30).'),
  mixup_alpha=(0.0, 'mixup Beta(alpha, alpha); 0 = off.'),
  cutmix_alpha=(0.0, 'cutmix Beta(alpha, alpha); 0 = off.'),
  shuffle_buffer=(16384, 'examples in the train shuffle buffer.'),
  cache=(False, 'keep the still-encoded train examples in memory once read.'),
  skip_bad_images=(
    False,
    'An image folder is decoded once at start-up: undecodable files stop the run naming them, '
    'or with True are left out, each named in a warning.',
  ),
)

# config.optimizer.
OPTIMIZER_FIELDS: dict[str, tuple[Any, str]] = dict(
  name=('sgd', "'sgd' (Nesterov momentum) or 'adamw'."),
  learning_rate=(
    0.1,
    'Per 256 images: the peak rate is learning_rate * batch_size / 256 (linear scaling).',
  ),
  warmup_epochs=(5.0, 'linear warmup, then cosine decay to 0.'),
  momentum=(0.9, 'SGD momentum (Nesterov).'),
  b1=(0.9, 'AdamW beta1.'),
  b2=(0.999, 'AdamW beta2.'),
  weight_decay=(5e-05, 'decoupled; skips BN parameters and biases.'),
  grad_clip_norm=(0.0, '0 = off.'),
)

# config.detection: Mask R-CNN's heads over the backbone's stages and its training input
# (halonet/detection), read when config.task is 'detection'; the defaults are torchvision's and
# detectron2's for COCO.
DETECTION_FIELDS: dict[str, tuple[Any, str]] = dict(
  fpn_width=(256, 'channels of the pyramid levels P2-P6.'),
  anchor_sizes=((32, 64, 128, 256, 512), 'anchor side in pixels on P2 ... P6 (5 entries).'),
  anchor_ratios=((0.5, 1.0, 2.0), 'anchor height / width ratios at every cell.'),
  rpn_batch_per_image=(256, 'anchors sampled per image for the RPN loss.'),
  rpn_pre_nms_top_n=((2000, 1000), '(training, inference) proposals per level before NMS.'),
  rpn_post_nms_top_n=((2000, 1000), '(training, inference) proposals per image after NMS.'),
  roi_batch_per_image=(512, 'proposals sampled per image for the box and mask losses.'),
  box_hidden=(1024, "width of the box head's two fully connected layers."),
  mask_width=(256, "channels of the mask head's four 3x3 convs."),
  max_detections=(100, 'detections kept per image.'),
  max_objects=(100, 'ground-truth objects per training image (padded to this; more are cut).'),
  scale_range=(
    (0.1, 2.0),
    'train: large-scale jitter, the image resized to this share of image_size (its longer '
    'side), then an image_size square window of it taken.',
  ),
)

# ImageNet training defaults shared by every config; a group's default is its own fields.
TOP_FIELDS: dict[str, tuple[Any, str]] = dict(
  variant=('h1', 'name of the config (h0..h7, tiny, quickstart, ...).'),
  task=(
    'classification',
    "'classification', or 'detection': Mask R-CNN over the backbone (config.detection; "
    "input.dataset 'coco' or 'digit_scenes'), trained and evaluated by the same commands.",
  ),
  model=(MODEL_FIELDS, "the architecture (HaloNet's fields)."),
  image_size=(256, 's: train and eval image side in pixels.'),
  num_classes=(1000, 'classifier outputs (checked against the dataset).'),
  input=(INPUT_FIELDS, 'the data, its splits, preprocessing and augmentation.'),
  batch_size=(1024, 'global, across all devices and hosts.'),
  eval_batch_size=(1024, 'global eval batch (padded, every example counted once).'),
  num_epochs=(350.0, 'training length in epochs of full global batches.'),
  num_train_steps=(-1, '> 0 overrides num_epochs.'),
  optimizer=(OPTIMIZER_FIELDS, 'the optimizer and its schedule.'),
  detection=(DETECTION_FIELDS, "Mask R-CNN's heads and input, when task is 'detection'."),
  init_from=(
    '',
    "Fine-tuning (halonet/train/finetune.py): start from another run's workdir, or one of its "
    "checkpoints (WORKDIR/checkpoints/STEP); '' = from scratch.",
  ),
  trainable=('all', "'all', or 'head' (the classifier only)."),
  label_smoothing=(0.1, 'label smoothing of the cross-entropy targets.'),
  ema_decay=(0.0, '> 0 keeps (and evaluates) an EMA of the params.'),
  mesh_shape=(
    (-1, 1),
    "Device mesh (data, spatial): examples split over data, each image's rows over spatial "
    '(spatial partitioning, for images too large for one device); data * spatial = devices, -1 '
    'takes what is left.',
  ),
  log_every_steps=(100, 'progress line and TensorBoard scalars every N steps.'),
  eval_every_steps=(5000, 'evaluation every N steps (and at the end).'),
  evals=(
    (),
    'More evaluations beside eval_splits, each a string (halonet/evaluators/specs.py): '
    "'imagenet2012_real' (ReaL), 'imagenet_v2/matched-frequency', 'imagenet_a', 'imagenet_r', "
    "'imagenet_sketch', 'imagenet2012_corrupted' (mCE), 'DATASET[:SPLIT]' (top-1/top-5) or "
    "'fewshot:DATASET[:TRAIN:TEST]' (linear probes); '@N' after one also runs it every N steps, "
    'else at the end and from eval.py.',
  ),
  fewshot_shots=((1, 5, 10, 25), "examples per class each 'fewshot:' probe is fit on."),
  fewshot_seeds=(3, 'draws of the shots per probe: the table shows their mean and spread.'),
  fewshot_l2=(1024.0, "L2 penalty of the probes' closed-form ridge regression."),
  checkpoint_every_steps=(1000, 'Orbax checkpoint every N steps (and at the end).'),
  keep_checkpoints=(3, 'checkpoints kept (the newest).'),
  seed=(0, 'parameters, data order, augmentation and dropout.'),
  storage_outage_minutes=(
    10.0,
    'how long an object store may stay unreachable (retried with backoff) before the run stops '
    'in one line naming the last committed checkpoint.',
  ),
  profile_steps=(
    (),
    '(first, last): a jax.profiler trace of those train steps in workdir/plugins/profile; () = '
    'off.',
  ),
)


def _defaults(fields: dict[str, tuple[Any, str]]) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      name: _defaults(default) if isinstance(default, dict) else default
      for name, (default, _) in fields.items()
    }
  )


def model_config() -> ml_collections.ConfigDict:
  """config.model's defaults: the fields of HaloNet."""
  return _defaults(MODEL_FIELDS)


def input_config() -> ml_collections.ConfigDict:
  """config.input's defaults."""
  return _defaults(INPUT_FIELDS)


# Fields that moved into config.input: a run stored before the move reads them there, and an
# old --config.FIELD override is told its new name.
MOVED_FIELDS = {name: f'input.{name}' for name in INPUT_FIELDS}


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default: the config each named config starts from."""
  return _defaults(TOP_FIELDS)


def field_help() -> list[tuple[str, Any, str]]:
  """(dotted field, default, meaning) of every config field (a group's members, not the group),
  sorted by field."""

  def flat(fields, prefix=''):
    for name, (default, meaning) in fields.items():
      if isinstance(default, dict):
        yield from flat(default, f'{prefix}{name}.')
      else:
        yield f'{prefix}{name}', default, meaning

  return sorted(flat(TOP_FIELDS))
