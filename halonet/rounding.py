"""Integer rounding: ceiling division (blocks covering a map, batches covering a split), and
timm's channel rounding, which fixes the hidden widths of its attention modules and blocks."""


def make_divisible(
  value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9
) -> int:
  """The nearest multiple of `divisor` (at least `min_value`, default `divisor`), raised by one
  `divisor` when rounding took it below `round_limit` of `value`."""
  floor = min_value or divisor
  rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < round_limit * value else rounded


def ceil_div(a: int, b: int) -> int:
  """a / b rounded up, for positive b: how many b-sized pieces cover a."""
  return -(-a // b)
