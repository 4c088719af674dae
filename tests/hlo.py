"""Reading compiled HLO and lowered StableHLO text in tests: collectives, their shapes, loop trip
counts, the largest array outside custom kernels."""

import re

import numpy as np

OP = re.compile(r'=\s*(?P<shape>.+?)\s(?P<op>[a-z][a-z0-9-]*?)(?:-start)?\(')
COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute', 'all-to-all')


def hlo_ops(hlo: str, names: tuple[str, ...]) -> list[tuple[str, str]]:
  """(op, result shape) of every instruction of an op in `names` in compiled HLO text."""
  found = []
  for line in hlo.splitlines():
    match = OP.search(line)
    if match and match['op'] in names:
      found.append((match['op'], match['shape']))
  return found


def array_dims(shape: str) -> list[list[int]]:
  """Dimensions of each array in an HLO shape, e.g. '(f32[8,2]{1,0}, f32[])' -> [[8, 2], []]."""
  return [
    [int(d) for d in dims.split(',') if d]
    for dims in re.findall(r'[a-z]+[0-9]*\[([0-9,]*)\]', shape)
  ]


def trip_counts(hlo: str) -> list[int]:
  """Known trip count of every while loop (XLA records it in the loop's backend config)."""
  return sorted(
    int(n)
    for line in hlo.splitlines()
    if re.search(r'\swhile\(', line)
    for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', line)
  )


def largest_array_outside(module: str, kernel_marker: str) -> int:
  """Elements of the largest tensor any op of lowered StableHLO text produces, except the
  custom calls whose line holds `kernel_marker` (e.g. 'tpu_custom_call')."""
  largest = 0
  for line in module.splitlines():
    if kernel_marker in line or '=' not in line:
      continue
    result = line.split('->')[-1] if '->' in line else line.split(':')[-1]
    for dims in re.findall(r'tensor<((?:\d+x)+)[a-z]', result):
      largest = max(largest, int(np.prod([int(d) for d in dims.rstrip('x').split('x')])))
  return largest
