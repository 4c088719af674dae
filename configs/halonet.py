"""Every HaloNet config, by name: `--config=configs/halonet.py:NAME`.

  h0 ... h7    the paper's variants on ImageNet (its rows are in halonet/paper.py)
  tiny         a few-thousand-parameter model on 32 px digits, for unit tests
  quickstart   a small all-attention model on the offline digits, 2 CPU cores
  digits_pretrain, digits_finetune   fine-tuning at a new size and on new classes, 2 CPU cores

Each is `base_config()` plus a few overrides written as data. configs/h0.py ... h7.py, tiny.py
and quickstart.py name the same configs. Every field can be overridden on the command line, e.g.
`--config.model.block_size=12`; the config is locked, so a typo fails naming the field.
"""

import ml_collections

from halonet import paper


def model_config() -> ml_collections.ConfigDict:
  """The architecture knobs a HaloNet sweep turns (defaults: H1); the fields of HaloNet."""
  return ml_collections.ConfigDict(dict(
      block_size=8,           # b: query block side.
      halo_size=3,            # h: halo width around each block.
      # Per-stage overrides of b and h (4 entries each); empty = use the two above.
      block_sizes=(),
      halo_sizes=(),
      value_ratio=1.0,        # r_v: attention value/output width = w * r_v.
      bottleneck_ratio=1.0,   # r_b: block output width = w * r_b.
      widths=(64, 128, 256, 512),
      stage_depths=(3, 3, 10, 3),  # (3, 3, l_3, 3).
      num_heads=(4, 8, 8, 8),
      final_width=0,          # d_f: final 1x1 conv before pooling; 0 = none.
      conv_stages=(),         # stages (1-4) that use a 3x3 conv instead of attention.
      mask_window=0,          # k > 0 restricts each query to a k x k window (masked attention).
      # 'plain' (loop-free, batch-parallel), 'rows' (row loop, hand-written backward: the CPU
      # fast path), 'pallas' (fused TPU kernels; interpreted on CPU, refused on GPU) or 'auto':
      # plain on TPU/GPU, rows on CPU (halonet/attention.py).
      attention_impl='auto',
      remat=False,            # recompute each block's activations in the backward pass.
      use_se=False,
      activation='relu',      # 'relu' or 'silu'.
      stochastic_depth_rate=0.0,
      dropout_rate=0.0,
      # compute dtype; params, optimizer state and softmax stay float32. 'auto': bfloat16 on
      # TPU/GPU, float32 on CPU.
      dtype='auto',
  ))


def base_config() -> ml_collections.ConfigDict:
  """ImageNet training defaults shared by every config."""
  config = ml_collections.ConfigDict()
  config.variant = 'h1'
  config.model = model_config()
  config.image_size = 256
  config.num_classes = 1000

  # Data: a TFDS name ('imagenet2012', 'imagenet_v2/matched-frequency', ...),
  # 'image_folder' (class per sub-folder under data_dir) or 'digits' (offline quick-start).
  config.dataset = 'imagenet2012'
  config.data_dir = ''          # TFDS data_dir, or the root of an image folder.
  config.manual_dir = ''        # where the ImageNet tars were downloaded by hand.
  config.train_split = 'train'
  config.eval_splits = ('validation',)
  config.crop_fraction = 0.875  # eval: resize to s / crop_fraction, centre crop s.
  config.crop_area_range = (0.08, 1.0)  # train: Inception crop's share of the image area.
  config.random_flip = True     # train: horizontal flips (off for data such as digits).
  config.randaugment_layers = 2
  config.randaugment_magnitude = 10
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  config.shuffle_buffer = 16_384
  config.cache = False
  # An image folder is decoded once at start-up: undecodable files stop the run naming them,
  # or with True are left out, each named in a warning.
  config.skip_bad_images = False

  config.batch_size = 1024      # global, across all devices and hosts.
  config.eval_batch_size = 1024
  config.num_epochs = 350.0
  config.num_train_steps = -1   # > 0 overrides num_epochs.

  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd',               # 'sgd' (Nesterov momentum) or 'adamw'.
      # Per 256 images: the peak rate is learning_rate * batch_size / 256 (linear scaling).
      learning_rate=0.1,
      warmup_epochs=5.0,
      momentum=0.9,
      b1=0.9,
      b2=0.999,
      weight_decay=5e-5,        # decoupled; skips BN parameters and biases.
      grad_clip_norm=0.0,       # 0 = off.
  ))
  # Fine-tuning (halonet/finetune.py): start from another run's workdir, or one of its
  # checkpoints (WORKDIR/checkpoints/STEP); '' = from scratch. 'head' trains the classifier only.
  config.init_from = ''
  config.trainable = 'all'
  config.label_smoothing = 0.1
  config.ema_decay = 0.0        # > 0 keeps (and evaluates) an EMA of the params.

  # Device mesh (data, spatial): examples split over data, each image's rows over spatial
  # (spatial partitioning, for images too large for one device); data * spatial = devices,
  # -1 takes what is left.
  config.mesh_shape = (-1, 1)

  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.seed = 0
  # (first, last): a jax.profiler trace of those train steps in workdir/plugins/profile; () = off.
  config.profile_steps = ()
  return config


def paper_overrides(row: paper.Variant) -> dict:
  """A paper row as config overrides."""
  return {'image_size': row.image_size, 'model.block_size': row.block_size,
          'model.halo_size': row.halo_size, 'model.value_ratio': row.value_ratio,
          'model.bottleneck_ratio': row.bottleneck_ratio,
          'model.stage_depths': (3, 3, row.stage3_depth, 3), 'model.final_width': row.final_width,
          # From 448 px a train step needs 2.4-5.4 GB per image without remat (bench/run.py,
          # costs): recompute each block in the backward pass so a realistic batch fits.
          'model.remat': row.image_size >= 448}


# The offline digits at 32 px, one block per stage: what the CPU-sized configs share.
# Digits fill their 8x8 frame and are not mirror-symmetric: mild crops, no flips, no eval crop.
DIGITS = {
    'image_size': 32, 'num_classes': 10, 'dataset': 'digits', 'eval_splits': ('test',),
    'crop_area_range': (0.4, 1.0), 'random_flip': False, 'crop_fraction': 1.0,
    'randaugment_layers': 0, 'randaugment_magnitude': 0,
    'model.stage_depths': (1, 1, 1, 1),
    'model.dtype': 'float32',  # CPU-sized: float32 wherever it runs.
}

CPU_CONFIGS = {
    'tiny': {
        **DIGITS,
        'model.block_size': 4, 'model.halo_size': 1,
        'model.widths': (8, 16, 16, 32), 'model.num_heads': (2, 2, 2, 2),
        'batch_size': 16, 'eval_batch_size': 16, 'num_train_steps': 4, 'shuffle_buffer': 256,
        'optimizer.warmup_epochs': 0.0,
        'log_every_steps': 1, 'eval_every_steps': 4, 'checkpoint_every_steps': 2,
    },
    'quickstart': {
        **DIGITS,
        'model.block_size': 4, 'model.halo_size': 2,
        'model.widths': (32, 64, 96, 128), 'model.num_heads': (4, 4, 4, 4),
        'batch_size': 64, 'eval_batch_size': 200, 'num_epochs': 60.0, 'shuffle_buffer': 2048,
        'label_smoothing': 0.0,
        # 4e-3 per 256 images: 1e-3 at batch 64.
        'optimizer.name': 'adamw', 'optimizer.learning_rate': 4e-3,
        'optimizer.weight_decay': 0.05, 'optimizer.warmup_epochs': 1.0,
        'log_every_steps': 20, 'eval_every_steps': 500, 'checkpoint_every_steps': 500,
    },
}
# Fine-tuning on 2 CPU cores (halonet/finetune.py): pre-train on the digits 0-5 at 32 px, then
# fine-tune on the digits 6-9 at 48 px with --config.init_from=<the first run's workdir> (the
# classifier is re-initialised: 4 classes, not 6). Without init_from: the same run from scratch.
CPU_CONFIGS['digits_pretrain'] = {
    **CPU_CONFIGS['quickstart'], 'dataset': 'digits/0-5', 'num_classes': 6, 'num_epochs': 40.0}
CPU_CONFIGS['digits_finetune'] = {
    **CPU_CONFIGS['quickstart'], 'dataset': 'digits/6-9', 'num_classes': 4, 'image_size': 48,
    'num_epochs': 15.0, 'optimizer.learning_rate': 1e-3 * 256 / 64}

NAMES = (*paper.VARIANTS, *CPU_CONFIGS)


def get_config(name: str = 'h1') -> ml_collections.ConfigDict:
  """The config called `name` (see the module docstring)."""
  if name in paper.VARIANTS:
    overrides = paper_overrides(paper.VARIANTS[name])
  elif name in CPU_CONFIGS:
    overrides = CPU_CONFIGS[name]
  else:
    raise ValueError(f'unknown HaloNet config {name!r}; expected one of {list(NAMES)}')
  config = base_config()
  config.variant = name
  config.update_from_flattened_dict(overrides)
  return config
