"""Shared defaults for every HaloNet config; variant files override the paper's row.

Every field can be overridden on the command line, e.g. `--config.model.block_size=12`.
"""

import ml_collections

# The paper's H0-H7 rows (Vaswani et al. 2021, table of HaloNet variants):
# b, h, r_v, r_b, l_3, s, d_f (0 = no final 1x1 conv), params (M).
PAPER_VARIANTS = {
    'h0': dict(b=8, h=3, rv=1.0, rb=0.5, l3=7, s=256, df=0, params_m=5.5),
    'h1': dict(b=8, h=3, rv=1.0, rb=1.0, l3=10, s=256, df=0, params_m=8.1),
    'h2': dict(b=8, h=3, rv=1.0, rb=1.25, l3=11, s=256, df=0, params_m=9.4),
    'h3': dict(b=10, h=3, rv=1.0, rb=1.5, l3=12, s=320, df=1024, params_m=12.3),
    'h4': dict(b=12, h=2, rv=1.0, rb=3.0, l3=12, s=384, df=1280, params_m=19.1),
    'h5': dict(b=14, h=2, rv=2.5, rb=2.0, l3=23, s=448, df=1536, params_m=30.7),
    'h6': dict(b=8, h=4, rv=3.0, rb=2.75, l3=24, s=512, df=1536, params_m=43.4),
    'h7': dict(b=10, h=3, rv=4.0, rb=3.5, l3=26, s=600, df=2048, params_m=67.0),
}


def model_config() -> ml_collections.ConfigDict:
  """The architecture knobs a HaloNet sweep turns (defaults: H1)."""
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
      # fast path) or 'auto': plain on TPU/GPU, rows on CPU (halonet/attention.py).
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


def get_config() -> ml_collections.ConfigDict:
  """ImageNet training defaults shared by H0-H7."""
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

  config.batch_size = 1024      # global, across all devices and hosts.
  config.eval_batch_size = 1024
  config.num_epochs = 350.0
  config.num_train_steps = -1   # > 0 overrides num_epochs.

  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd',               # 'sgd' (Nesterov momentum) or 'adamw'.
      learning_rate=0.1,        # per 256 images; scaled by batch_size / 256.
      warmup_epochs=5.0,
      momentum=0.9,
      b1=0.9,
      b2=0.999,
      weight_decay=5e-5,        # decoupled; skips BN parameters and biases.
      grad_clip_norm=0.0,       # 0 = off.
  ))
  config.label_smoothing = 0.1
  config.ema_decay = 0.0        # > 0 keeps (and evaluates) an EMA of the params.

  # Device mesh: data * model must equal the device count; -1 takes what is left.
  config.mesh_shape = (-1, 1)

  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.seed = 0
  return config


def variant_config(name: str) -> ml_collections.ConfigDict:
  """`get_config()` with the paper's row for variant `name` filled in."""
  if name not in PAPER_VARIANTS:
    raise ValueError(f'unknown HaloNet variant {name!r}; expected one of {sorted(PAPER_VARIANTS)}')
  row = PAPER_VARIANTS[name]
  config = get_config()
  config.variant = name
  config.image_size = row['s']
  m = config.model
  m.block_size, m.halo_size = row['b'], row['h']
  m.value_ratio, m.bottleneck_ratio = row['rv'], row['rb']
  m.stage_depths = (3, 3, row['l3'], 3)
  m.final_width = row['df']
  # From 448 px a train step needs 2.4-5.4 GB per image without remat (bench/run.py, costs):
  # recompute each block in the backward pass so a realistic per-device batch fits.
  m.remat = row['s'] >= 448
  return config


def digits_config() -> ml_collections.ConfigDict:
  """`get_config()` for the offline digits at 32 px; the CPU-sized configs add a model."""
  config = get_config()
  config.image_size = 32
  config.num_classes = 10
  config.model.stage_depths = (1, 1, 1, 1)
  config.model.dtype = 'float32'  # CPU-sized: float32 wherever it runs.
  config.dataset = 'digits'
  config.eval_splits = ('test',)
  # Digits fill their 8x8 frame and are not mirror-symmetric: mild crops, no flips, no eval crop.
  config.crop_area_range = (0.4, 1.0)
  config.random_flip = False
  config.crop_fraction = 1.0
  config.randaugment_layers = 0
  config.randaugment_magnitude = 0
  return config
