"""Device mesh and data placement: examples split over 'data', image rows over 'spatial'.

The state is replicated. Under `jax.jit` with these shardings XLA inserts the collectives itself,
so BatchNorm statistics and the gradient are global over the batch without any `axis_name`.

The 'spatial' axis splits every image's height (spatial partitioning): with mesh (data, spatial)
each device holds 1/spatial of the rows of batch/data images, so images too large for one
device's memory (H7 at 600 px, detection-sized inputs) still train. Convolutions and pooling are
partitioned by XLA (each device exchanges its border rows); halo attention exchanges only its h
halo rows between neighbouring devices (halonet/attention/spatial.py).
"""

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import functools
import json
from typing import Any

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from halonet import errors

DATA_AXIS = 'data'  # The mesh axis the batch is split over.
SPATIAL_AXIS = 'spatial'  # The mesh axis image rows are split over.
AXES = (DATA_AXIS, SPATIAL_AXIS)
IMAGE_KEY = 'image'  # The batch entry whose rows (axis 1) split over SPATIAL_AXIS.
PREFETCH_BATCHES = 2  # Batches placed on the devices ahead of the one a step is consuming.


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int]:
  """(data, spatial) sizes with a -1 filled in; raises one line if they cannot cover the devices."""
  shape = tuple(int(n) for n in mesh_shape)
  if len(shape) != 2 or shape.count(-1) > 1 or any(n == 0 or n < -1 for n in shape):
    raise errors.ConfigError(
      f'config.mesh_shape={shape} must be (data, spatial) positive sizes, at most one -1'
    )
  known = int(np.prod([n for n in shape if n != -1]))
  if -1 in shape:
    if num_devices % known:
      raise errors.ConfigError(
        f'config.mesh_shape={shape} does not divide the {num_devices} devices'
      )
    shape = tuple(num_devices // known if n == -1 else n for n in shape)
  if shape[0] * shape[1] != num_devices:
    raise errors.ConfigError(
      f'config.mesh_shape={shape} needs {shape[0] * shape[1]} devices but there are {num_devices}'
    )
  return shape


def create_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'spatial') mesh; Auto axes so XLA partitions everything outside shard_map."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def traced_within(mesh: Mesh, fn: Callable) -> Callable:
  """`fn`, traced with `mesh` as the abstract mesh: layers that shard_map over the data axis
  (the CPU attention path) then see it, however the jitted step is called."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def per_device_images(fn: Callable[..., jax.Array], batched: int = 3) -> Callable[..., jax.Array]:
  """`fn(*images, *shared)`, its first `batched` arguments led by the batch, run per device under
  the traced mesh's data axis.

  Without varying-axis checks (`check_vma=False`: Pallas' CPU interpreter fails them), shard_map
  sums the gradients of the replicated `shared` inputs over the devices itself.

  For what XLA cannot partition over the batch without gathering it (a loop over images, a
  custom kernel, a grouped convolution's kernel gradient): under a mesh with a data axis each
  device computes its own images and the batch stays sharded (no all-gather). Already inside a
  data-manual region, or without one, `fn` runs as is.
  """

  def wrapped(*args: jax.Array) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    data = 1 if mesh.empty else mesh.shape.get(DATA_AXIS, 1)
    if data == 1 or args[0].shape[0] % data or DATA_AXIS in mesh.manual_axes:
      return fn(*args)
    images = P(DATA_AXIS)
    # Manual over the data axis only: the transpose sums the shared inputs' gradients over the
    # axes it is manual in, and nothing else.
    return jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=(images,) * batched + (P(),) * (len(args) - batched),
      out_specs=images,
      axis_names={DATA_AXIS},
      check_vma=False,
    )(*args)

  return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spatial_size(mesh: jax.sharding.AbstractMesh | Mesh) -> int:
  """Devices each image's rows are split over (1 without a mesh)."""
  return 1 if mesh.empty else mesh.shape.get(SPATIAL_AXIS, 1)


def batch_shardings(mesh: Mesh, keys: Iterable[str]) -> dict[str, NamedSharding]:
  """Every entry's examples split over 'data'; the images' rows also over 'spatial'."""
  return {
    key: NamedSharding(mesh, P(DATA_AXIS, SPATIAL_AXIS) if key == IMAGE_KEY else P(DATA_AXIS))
    for key in keys
  }


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Joins each process's local examples into global arrays placed by `batch_shardings`."""
  shardings = batch_shardings(mesh, batch)
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()
  }


def prefetch_to_device(
  batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, size: int = PREFETCH_BATCHES
) -> Iterator[dict[str, jax.Array]]:
  """Sharded batches placed `size` ahead: the next host->device copies overlap this step."""
  queue = collections.deque()
  for batch in batches:
    queue.append(shard_batch(batch, mesh))  # Asynchronous: returns before the copy is done.
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# How long a process waits for process 0 to publish what every process needs (its measured
# attention forms: minutes on a large model; the workdir's lease: seconds) before it gives up.
PEER_TIMEOUT_S = 1800.0
_published: collections.Counter = collections.Counter()


def broadcast_json(obj: Any, what: str, timeout_s: float = PEER_TIMEOUT_S) -> Any:
  """Process 0's `obj` on every process, through the coordination service's key-value store
  (the k-th call for `what` on each process reads process 0's k-th). A process that waits more
  than `timeout_s` fails in one line naming what it waited for, instead of hanging the job."""
  if jax.process_count() == 1:
    return obj
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  # As Orbax reaches it.

  _published[what] += 1
  key = f'halonet/{what}/{_published[what]}'
  client = distributed.global_state.client
  if jax.process_index() == 0:
    client.key_value_set(key, json.dumps(obj))
    return obj
  try:
    return json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))
  except Exception as e:  # pylint: disable=broad-except  # The runtime's own deadline error.
    raise errors.PeerTimeout(
      f'process {jax.process_index()} waited {timeout_s:.0f} s for process 0 to publish {what} '
      f'and gave up ({" ".join(str(e).split())[:200]}); process 0 stalled or died: see its log'
    ) from None
