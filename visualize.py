"""Draws a trained run's attention maps over an image:

  python visualize.py --workdir=W --image=photo.png --out=attention.png
      [--layer=stage1_block0] [--queries="10,12;40,30"] [--image_size=64]

One row per query pixel, one column per head (halonet/tools/visualize.py).
"""

from halonet.tools import visualize
from halonet.train import launch

if __name__ == '__main__':
  visualize.define_flags()
  launch.run(visualize.main)
