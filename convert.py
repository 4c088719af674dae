"""Converts one of timm's trained halo networks into a run of this project:

  python convert.py --model=halonet50ts --weights=PATH/model.safetensors --workdir=W

W then holds config.json and a step-0 checkpoint that eval.py, predict.py, visualize.py and
--config.init_from take like any run (halonet/tools/convert.py, docs/timm.md).
"""

from halonet.tools import convert
from halonet.train import launch

if __name__ == '__main__':
  convert.define_flags()
  launch.run(convert.main)
