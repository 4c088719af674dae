"""Converts one of timm's trained halo networks into a run of this project:

  python convert.py --model=halonet50ts --weights=PATH/model.safetensors --workdir=W

W then holds config.json and a step-0 checkpoint that eval.py, predict.py, visualize.py and
--config.init_from take like any run (halonet/tools/convert.py, docs/timm.md).
"""

from absl import app

from halonet.tools import convert

if __name__ == '__main__':
  convert.define_flags()
  app.run(convert.main)
