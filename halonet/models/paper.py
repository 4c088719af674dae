"""The paper's HaloNet family, H0-H7 (Vaswani et al. 2021, table of HaloNet variants).

The rows configs are built from (configs/halonet.py) and the parameter counts the summary
compares against. Every variant shares the ResNet-style layout: base widths (64, 128, 256, 512),
heads (4, 8, 8, 8), stage depths (3, 3, l_3, 3).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the table."""

  block_size: int  # b
  halo_size: int  # h
  value_ratio: float  # r_v
  bottleneck_ratio: float  # r_b
  stage3_depth: int  # l_3
  image_size: int  # s
  final_width: int  # d_f; 0: no final 1x1 conv
  params_m: float  # published parameter count, millions


VARIANTS = {
  'h0': Variant(8, 3, 1.0, 0.5, 7, 256, 0, 5.5),
  'h1': Variant(8, 3, 1.0, 1.0, 10, 256, 0, 8.1),
  'h2': Variant(8, 3, 1.0, 1.25, 11, 256, 0, 9.4),
  'h3': Variant(10, 3, 1.0, 1.5, 12, 320, 1024, 12.3),
  'h4': Variant(12, 2, 1.0, 3.0, 12, 384, 1280, 19.1),
  'h5': Variant(14, 2, 2.5, 2.0, 23, 448, 1536, 30.7),
  'h6': Variant(8, 4, 3.0, 2.75, 24, 512, 1536, 43.4),
  'h7': Variant(10, 3, 4.0, 3.5, 26, 600, 2048, 67.0),
}
