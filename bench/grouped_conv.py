"""haloregnetz_b's forward and backward (batch 4, 224 px, float32) with XLA's grouped
convolution against halonet/models/grouped_conv.py's, compiled and timed interleaved in one
process (median of 3):

    python bench/grouped_conv.py

On CPU the ratio is what the shifted-view kernel gradient buys; on TPU and GPU both forms are
XLA's (jax.lax.platform_dependent), so the ratio there is ~1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from halonet.models import grouped_conv  # noqa: E402
from halonet.models import networks
from halonet.tools import convert  # noqa: E402

config = convert.model_config('haloregnetz_b')
config.model.dtype = 'float32'
model = networks.create_model(config)
x = jnp.ones((4, 224, 224, 3))
v = model.init(jax.random.key(0), x[:1], train=False)


def loss(p):
  y, _ = model.apply(
    {'params': p, 'batch_stats': v['batch_stats']},
    x,
    train=True,
    mutable=['batch_stats'],
    rngs={'dropout': jax.random.key(0)},
  )
  return y.sum()


ours = jax.jit(jax.grad(loss)).lower(v['params']).compile()
grouped_conv.grouped_conv = lambda *a, feature_group_count, **k: jax.lax.conv_general_dilated(
  *a, feature_group_count=feature_group_count, **k
)
xla = jax.jit(jax.grad(loss)).lower(v['params']).compile()
times = {'ours': [], 'xla': []}
for _ in range(3):
  for name, f in (('ours', ours), ('xla', xla)):
    t = time.perf_counter()
    jax.block_until_ready(f(v['params']))
    times[name].append(time.perf_counter() - t)
m = {k: statistics.median(t) for k, t in times.items()}
print({k: f'{4 / s:.2f} img/s' for k, s in m.items()}, f'ratio {m["xla"] / m["ours"]:.1f}x')
