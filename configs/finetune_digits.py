"""Fine-tuning on 2 CPU cores, in two runs (README, "Fine-tuning"):

  python train.py --config=configs/finetune_digits.py:pretrain --workdir=/tmp/digits0-5
  python train.py --config=configs/finetune_digits.py --workdir=/tmp/digits6-9 \
      --config.init_from=/tmp/digits0-5

The same configs as configs/halonet.py:digits_pretrain and :digits_finetune.
"""

from configs import halonet


def get_config(stage: str = 'finetune'):
  return halonet.get_config(f'digits_{stage}')
