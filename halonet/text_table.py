"""Fixed-width text tables for the terminal (the summary, sweep results)."""

from typing import Any


def format_table(rows: list[dict[str, Any]]) -> str:
  """One column per key (in first-seen order), values as str (None blank), a rule under the
  header; columns of numbers right-aligned, others left-aligned."""
  columns = list(dict.fromkeys(k for r in rows for k in r))
  cells = [['' if r.get(c) is None else str(r[c]) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  numeric = [all(_is_number(row[i]) for row in cells if row[i]) for i in range(len(columns))]

  def line(values: list[str]) -> str:
    return '  '.join(
      v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
    ).rstrip()

  header = line(columns)
  return '\n'.join([header, '-' * len(header)] + [line(row) for row in cells])


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True
