"""The lambda layer (Bello, "LambdaNetworks", ICLR 2021) as timm builds it (layers/lambda_layer.py),
for timm's lamhalobotnet50ts_256.

Instead of attention maps, each position's query reads two linear functions ("lambdas") of the
values: a content lambda shared by all positions (softmax-normalised keys times values) and a
position lambda from the values in an r x r neighbourhood (one learnt r x r filter per key
channel, applied to every value channel). Heads share keys and values (multi-query); the value
width per head is the output width over the heads.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halonet.models import conv_norm


class LambdaLayer(nn.Module):
  """[B, H, W, C] -> [B, H/stride, W/stride, C]; BatchNorm on queries and values, as timm's."""

  num_heads: int = 4
  key_width: int = 16  # Query and key channels per head (timm's dim_head).
  radius: int = 9  # r: the side of the position lambda's neighbourhood (odd).
  stride: int = 1  # 2: average-pooled after, as timm's.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    batch, height, width, channels = x.shape
    heads, keys = self.num_heads, self.key_width
    values = channels // heads
    qkv = nn.Conv(
      heads * keys + keys + values, (1, 1), use_bias=False, dtype=self.dtype, name='qkv'
    )(x)
    q, k, v = jnp.split(qkv, [heads * keys, heads * keys + keys], axis=-1)
    norm = conv_norm.batch_norm(train, self.dtype)
    positions = height * width
    q = norm(name='norm_q')(q).reshape(batch, positions, heads, keys)
    v = norm(name='norm_v')(v)
    k = jax.nn.softmax(k.reshape(batch, positions, keys).astype(jnp.float32), axis=1)
    content_lambda = jnp.einsum(
      'bmk,bmv->bkv', k.astype(self.dtype), v.reshape(batch, positions, values)
    )
    # Every value channel through the same r x r filters, one per key channel (zero-padded).
    pad = self.radius // 2
    per_channel = v.transpose(0, 3, 1, 2).reshape(batch * values, height, width, 1)
    position_lambdas = nn.Conv(
      keys,
      (self.radius, self.radius),
      padding=((pad, pad), (pad, pad)),
      dtype=self.dtype,
      name='conv_lambda',
    )(per_channel).reshape(batch, values, positions, keys)
    out = jnp.einsum('bmnk,bkv->bmnv', q, content_lambda) + jnp.einsum(
      'bmnk,bvmk->bmnv', q, position_lambdas
    )
    out = out.reshape(batch, height, width, heads * values)
    if self.stride == 2:
      out = nn.avg_pool(out, (2, 2), strides=(2, 2))
    return out
