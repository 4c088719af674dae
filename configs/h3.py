"""HaloNet-H3 with the paper's b, h, r_v, r_b, l_3, s, d_f."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  return base.variant_config('h3')
