"""HaloNet: blocked local self-attention backbones (Vaswani et al., CVPR 2021) in Flax."""

import os

# Object-store paths go through fsspec (gcsfs), not TensorFlow's filesystem: set before etils'
# epath first picks a backend, which it then caches (halonet/paths.py says why).
os.environ.setdefault('EPATH_USE_TF', 'false')
