"""Reading compiled HLO text in tests: collectives, their shapes, loop trip counts."""

import re

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
