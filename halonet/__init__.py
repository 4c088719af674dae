"""HaloNet: blocked local self-attention backbones (Vaswani et al., CVPR 2021) in Flax."""
