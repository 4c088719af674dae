"""What the sweeps share: the paper-scale base (H1 on ImageNet) and a CPU scale on digits.

The CPU scale is the tiny model at 32 px, 200 AdamW steps on scikit-learn's digits: under a
minute a point on 2 cores, mostly compilation; the window sweep's points reach 72-84% top-1
(README, "Ablation sweeps"), far above chance (10%).
"""

import ml_collections

PAPER_BASE = 'configs/h1.py'
CPU_BASE = 'configs/tiny.py'
SCALES = ('paper', 'cpu')


def sweep_config(scale: str) -> ml_collections.ConfigDict:
  """A sweep's base and base_overrides at `scale`; the caller adds its grid or points."""
  if scale not in SCALES:
    raise ValueError(f'sweep scale {scale!r} is not one of {SCALES}')
  config = ml_collections.ConfigDict()
  config.base = PAPER_BASE
  # data_dir is here so a launch can set it: --sweep.base_overrides.input.data_dir=gs://B/tfds.
  config.base_overrides = {'input': {'data_dir': ''}}
  # e.g. --sweep.seeds="(0, 1, 2)": each point once per seed, reported as mean and std.
  config.seeds = ()
  if scale == 'cpu':
    config.base = CPU_BASE
    config.base_overrides = dict(
      input=dict(data_dir=''),
      num_train_steps=200,
      batch_size=64,
      eval_batch_size=120,
      optimizer=dict(name='adamw', learning_rate=2e-2, weight_decay=0.05, warmup_epochs=0.5),
      log_every_steps=50,
      eval_every_steps=200,
      checkpoint_every_steps=100,
    )
  return config
