"""Halo attention with each image's rows split over the mesh's 'spatial' axis.

Under mesh (data, spatial), every device holds a band of whole rows of query blocks of its own
images. A block's neighbourhood reaches h rows beyond its band, so before attending each device
receives the h rows just above its band from the device above and the h rows just below from
the device below: two `lax.ppermute`s of h rows (more hops only when h exceeds a band). Nothing
else moves: there is no all-gather of the map. The devices at the top and bottom of the image
receive zeros, the border padding that the key mask hides anyway.

The map is padded (and masked, as for any size b does not divide) to a multiple of spatial block
rows, so any height works; a height that already splits into whole block rows per device has no
padding and no data movement besides the halo exchange.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from halonet import sharding
from halonet.rounding import ceil_div

Attend = Callable[..., jax.Array]


def receive_rows(x: jax.Array, rows: int, from_above: bool, axis_name: str) -> jax.Array:
  """The `rows` map rows (axis 1) adjacent to this device's band, from its neighbours along
  `axis_name` (zeros past the first/last device). Only those rows are sent."""
  if rows == 0:
    return x[:, :0]
  devices, band = jax.lax.axis_size(axis_name), x.shape[1]
  pieces = []
  for hop in range(1, ceil_div(rows, band) + 1):  # One hop unless h exceeds a band.
    wanted = min(band, rows - (hop - 1) * band)
    send = x[:, band - wanted :] if from_above else x[:, :wanted]
    shift = hop if from_above else -hop
    pairs = [(i, i + shift) for i in range(devices) if 0 <= i + shift < devices]
    pieces.append(jax.lax.ppermute(send, axis_name, pairs))
  # Nearest neighbour's rows next to the band: above, the farthest come first.
  ordered = pieces[::-1] if from_above else pieces
  return jnp.concatenate(ordered, axis=1)


def spatial_attention(
  attend: Attend,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  rel_h: jax.Array,
  rel_w: jax.Array,
  bias_h: jax.Array,
  bias_w: jax.Array,
  *,
  block_size: int,
  halo_size: int,
  num_heads: int,
) -> jax.Array:
  """`attend` (an implementation of `plain.plain_attention`'s contract) per device band.

  Args as `plain_attention`'s, except that `k` and `v` are padded by h along the width only:
  their height is exactly nbh * b, and nbh (q's block rows, also bias_h's) is a multiple of the
  spatial axis size. The batch must divide over the data axis.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = (sharding.DATA_AXIS, sharding.SPATIAL_AXIS)

  def with_halo(x):
    above = receive_rows(x, halo_size, True, sharding.SPATIAL_AXIS)
    below = receive_rows(x, halo_size, False, sharding.SPATIAL_AXIS)
    return jnp.concatenate([above, x, below], axis=1)

  def per_device(q, k, v, rel_h, rel_w, bias_h, bias_w):
    return attend(
      q,
      with_halo(k),
      with_halo(v),
      rel_h,
      rel_w,
      bias_h,
      bias_w,
      block_size=block_size,
      halo_size=halo_size,
      num_heads=num_heads,
    )

  rows = P(*axes)
  # Without varying-axis checks (Pallas' CPU interpreter fails them), shard_map sums the
  # gradients of the replicated tables and masks over the devices itself.
  return jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(rows, rows, rows, P(), P(), P(sharding.SPATIAL_AXIS), P()),
    out_specs=rows,
    check_vma=False,
  )(q, k, v, rel_h, rel_w, bias_h, bias_w)


def applies(batch: int) -> bool:
  """Whether the traced mesh splits image rows (and the batch divides over its data axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  return (
    sharding.spatial_size(mesh) > 1
    and batch % (1 if mesh.empty else mesh.shape.get(sharding.DATA_AXIS, 1)) == 0
  )


def padded_block_rows(block_rows: int) -> int:
  """Block rows padded to a multiple of the traced mesh's spatial size (unchanged without one)."""
  spatial = sharding.spatial_size(jax.sharding.get_abstract_mesh())
  return ceil_div(block_rows, spatial) * spatial
