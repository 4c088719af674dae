"""Compile for a TPU on a machine without one: XLA's TPU compiler, Mosaic included, through libtpu.

JAX compiles ahead of time for a TPU topology described by libtpu (`jax.experimental.topologies`)
on any host; nothing runs. What comes back is what the TPU compiler decided: the buffer plan
(HBM per device), XLA's cost analysis, VMEM limits enforced on Pallas kernels, and, from the
compiler's dump, the static schedule of each Mosaic kernel: VLIW bundles per loop body and the
loops' trip counts, i.e. cycles per call if no bundle waits on memory.

`configure()` must run before jax is imported (libtpu reads its flags when it loads). libtpu is
not a dependency of the project: install it beside it (it must not sit in site-packages, where
JAX would try to start a TPU backend on this host):

    pip install --target ~/.cache/halonet/libtpu -r requirements-tpu-aot.txt
"""

import atexit
import glob
import math
import os
import re
import shutil
import tempfile
from typing import Any

# Outside any checkout, so that every clone on the machine finds it (the README says how).
LIBTPU_TARGET = os.path.join(os.path.expanduser('~'), '.cache', 'halonet', 'libtpu')
DEFAULT_LIBTPU = os.path.join(LIBTPU_TARGET, 'libtpu', 'libtpu.so')
INSTALL = f'pip install --target {LIBTPU_TARGET} -r requirements-tpu-aot.txt'
# Topology names libtpu knows, and the data-sheet figures the estimates use (per chip).
CHIPS = {
  'v5e': {
    'topology': 'v5e:1x1',
    'clock_hz': 1.5e9,
    'hbm_bytes_per_s': 819e9,
    'hbm_bytes': 16 * 2**30,
  },
  'v6e': {
    'topology': 'v6e:1x1',
    'clock_hz': 1.75e9,
    'hbm_bytes_per_s': 1640e9,
    'hbm_bytes': 32 * 2**30,
  },
  'v5p': {
    'topology': 'v5p:1x1x1',
    'clock_hz': 1.75e9,
    'hbm_bytes_per_s': 2765e9,
    'hbm_bytes': 95 * 2**30,
  },
}


def libtpu_path() -> str | None:
  """The libtpu.so to compile with: $HALONET_LIBTPU, else LIBTPU_TARGET's, if present."""
  path = os.environ.get('HALONET_LIBTPU', DEFAULT_LIBTPU)
  return path if os.path.exists(path) else None


def configure() -> str:
  """Points JAX at libtpu for compilation only (the backend stays CPU) and asks the compiler to
  dump its final schedules; returns the dump directory. Call before importing jax."""
  path = libtpu_path()
  if path is None:
    raise SystemExit(
      f'libtpu not found at {DEFAULT_LIBTPU} ($HALONET_LIBTPU); install it with: {INSTALL}'
    )
  dump = tempfile.mkdtemp(prefix='halonet_tpu_dump_')
  os.environ.update(
    {
      'TPU_LIBRARY_PATH': path,
      'JAX_PLATFORMS': 'cpu',
      # A single-host topology with no TPU metadata server to ask.
      'TPU_ACCELERATOR_TYPE': 'v5litepod-1',
      'TPU_WORKER_HOSTNAMES': 'localhost',
      'TPU_WORKER_ID': '0',
      'TPU_SKIP_MDS_QUERY': '1',
      'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
      # Only each program's final schedule: every pass of every fusion is ~0.4 GB a layer.
      'LIBTPU_INIT_ARGS': f'--xla_jf_dump_to={dump} --xla_jf_dump_llo_text=true '
      '--xla_jf_dump_llo_pass_label_regex=final_bundles',
    }
  )
  atexit.register(shutil.rmtree, dump, ignore_errors=True)
  return dump


def device(chip: str) -> Any:
  """The first TensorCore of a one-chip `chip` topology, to place shapes on."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  topology = topologies.get_topology_desc(
    platform='tpu', topology_name=CHIPS[chip]['topology'], chips_per_host_bounds=(1, 1, 1)
  )
  return topology.devices[0]


def compile_stats(lowered: Any, dump: str) -> dict[str, Any]:
  """Compiles a `jax.stages.Lowered` for its TPU and returns its memory and cost analysis.
  The dump then holds this compile's schedules only."""
  clear(dump)
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  return {
    'temp_bytes': memory.temp_size_in_bytes,
    'argument_bytes': memory.argument_size_in_bytes,
    'output_bytes': memory.output_size_in_bytes,
    'flops': cost.get('flops', 0.0),
    'bytes_accessed': cost.get('bytes accessed', 0.0),
  }


_BUNDLE = re.compile(r'^\s*(0x[0-9a-f]+|0)\s+(?:[A-Z]{2})?:?\s*(>*)\s*\{')
_EXIT_TEST = re.compile(r', (\d+) /\* loop exit test')


def static_cycles(schedule_text: str) -> dict[str, int]:
  """Cycles of one call of a compiled kernel from its final bundle listing: each bundle issues
  in one cycle, times the trip counts of the loops around it (nesting read off the listing's
  '>' marks, a loop's trip count off its exit test). Stalls on memory are not in it."""
  bundles, trips, opened = [], {}, [0]  # opened[d]: loops entered at depth d so far.
  for line in schedule_text.splitlines():
    match = _BUNDLE.match(line)
    if not match:
      continue
    depth = len(match.group(2))
    while len(opened) <= depth:
      opened.append(0)
    if ' LB:' in line:  # A loop body starts: a new loop at this depth.
      opened[depth] += 1
    loops = tuple((d, opened[d]) for d in range(1, depth + 1))
    bundles.append(loops)
    exit_test = _EXIT_TEST.search(line)
    if exit_test and loops:
      trips[loops[-1]] = int(exit_test.group(1))
  cycles = sum(math.prod(trips.get(loop, 1) for loop in loops) for loops in bundles)
  return {'bundles': len(bundles), 'cycles': cycles, 'loops': len(trips)}


def clear(dump: str) -> None:
  """Empties the dump directory, so that the next compile's schedules are the only ones."""
  for path in glob.glob(os.path.join(dump, '*')):
    os.remove(path)


def kernel_schedules(dump: str, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
  """static_cycles of the kernels named `names` in the dump."""
  found = {}
  for path in sorted(glob.glob(os.path.join(dump, '*-final_bundles.txt'))):
    for name in names:
      if re.search(rf'-{re.escape(name)}(\.\d+)?-\d+-final_bundles\.txt$', path):
        with open(path) as f:
          found[name] = static_cycles(f.read())
  return found
