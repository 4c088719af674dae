"""RoIAlign (He et al. 2017, "Mask R-CNN"): a fixed-size map of each box, bilinear samples of a
feature map averaged per bin, with no rounding of the box; and the FPN level each box reads.

The sampling is torchvision's `roi_align(..., aligned=True)` with a fixed `sampling_ratio`: a
box's pixel coordinates are shifted by half a pixel, each bin averages sampling_ratio² samples
on a regular grid, a sample more than a pixel outside the map reads 0. The fixed grid (not one
that grows with the box, torchvision's sampling_ratio=0) keeps every shape static.
"""

import jax.numpy as jnp


def _axis_samples(start, extent, bins: int, ratio: int) -> jnp.ndarray:
  """[R, bins * ratio] sample coordinates along one axis of each box."""
  step = extent / bins
  offsets = (jnp.arange(bins)[:, None] + (jnp.arange(ratio)[None, :] + 0.5) / ratio).reshape(-1)
  return start[:, None] + offsets[None, :] * step[:, None]


def _bilinear_corners(coords: jnp.ndarray, size: jnp.ndarray):
  """(low index, high index, weight of low, weight of high, inside) of each sample [R, S] on an
  axis of `size` pixels ([R, 1]: each box's map), as torchvision's bilinear_interpolate."""
  inside = (coords >= -1.0) & (coords <= size)
  coords = jnp.maximum(coords, 0.0)
  low = jnp.floor(coords).astype(jnp.int32)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  coords = jnp.where(at_edge, low.astype(coords.dtype), coords)
  frac = coords - low
  return low, high, 1.0 - frac, frac, inside


def read_table(
  table: jnp.ndarray,
  boxes: jnp.ndarray,
  offset: jnp.ndarray,
  height: jnp.ndarray,
  width: jnp.ndarray,
  spatial_scale: jnp.ndarray,
  output_size: int,
  sampling_ratio: int = 2,
) -> jnp.ndarray:
  """[R, output_size, output_size, C]: RoIAlign of each box [R, 4] from its own map, a height x
  width block of rows of `table` [N, C] (row-major) starting at `offset`, read at
  `spatial_scale` (all [R]). Maps of several images or pyramid levels laid end to end in one
  table are read by one gather, whichever map each box reads."""
  scaled = boxes * spatial_scale[:, None] - 0.5
  ys = _axis_samples(scaled[:, 1], scaled[:, 3] - scaled[:, 1], output_size, sampling_ratio)
  xs = _axis_samples(scaled[:, 0], scaled[:, 2] - scaled[:, 0], output_size, sampling_ratio)
  y0, y1, wy0, wy1, y_in = _bilinear_corners(ys, height[:, None])
  x0, x1, wx0, wx1, x_in = _bilinear_corners(xs, width[:, None])
  start, row = offset[:, None, None], width[:, None, None]

  def gather(y, x):  # [R, S, S, C] with S = output_size * sampling_ratio.
    return table[start + y[:, :, None] * row + x[:, None, :]]

  corners = (
    (gather(y0, x0), wy0[:, :, None] * wx0[:, None, :]),
    (gather(y0, x1), wy0[:, :, None] * wx1[:, None, :]),
    (gather(y1, x0), wy1[:, :, None] * wx0[:, None, :]),
    (gather(y1, x1), wy1[:, :, None] * wx1[:, None, :]),
  )
  inside = (y_in[:, :, None] & x_in[:, None, :])[..., None]
  samples = sum(values * weights[..., None].astype(values.dtype) for values, weights in corners)
  samples = jnp.where(inside, samples, 0.0)
  r, s, channels = boxes.shape[0], sampling_ratio, table.shape[-1]
  samples = samples.reshape(r, output_size, s, output_size, s, channels)
  return samples.mean(axis=(2, 4))


def roi_align(
  features: jnp.ndarray,
  boxes: jnp.ndarray,
  image_indices: jnp.ndarray,
  output_size: int,
  spatial_scale: float,
  sampling_ratio: int = 2,
) -> jnp.ndarray:
  """[R, output_size, output_size, C] maps of `boxes` [R, 4] (x1, y1, x2, y2, image pixels) read
  from `features` [B, H, W, C] of the images `image_indices` [R] at `spatial_scale` (1 / the
  map's stride)."""
  _, height, width, channels = features.shape
  count = boxes.shape[0]
  return read_table(
    features.reshape(-1, channels),
    boxes,
    image_indices.astype(jnp.int32) * (height * width),
    jnp.full(count, height, jnp.int32),
    jnp.full(count, width, jnp.int32),
    jnp.full(count, spatial_scale, boxes.dtype),
    output_size,
    sampling_ratio,
  )


def fpn_levels(
  boxes: jnp.ndarray, lowest: int = 2, highest: int = 5, canonical: tuple[int, int] = (224, 4)
) -> jnp.ndarray:
  """[R] the pyramid level (lowest..highest) each box is read from: level
  floor(k0 + log2(sqrt(area) / s0)) with (s0, k0) = `canonical` (Lin et al. 2017, FPN, eq. 1)."""
  size, level = canonical
  widths = jnp.maximum(boxes[:, 2] - boxes[:, 0], 0.0)
  heights = jnp.maximum(boxes[:, 3] - boxes[:, 1], 0.0)
  k = jnp.floor(level + jnp.log2(jnp.sqrt(widths * heights) / size) + 1e-6)
  return jnp.clip(k, lowest, highest).astype(jnp.int32)
