"""ImageNet-1k's class descriptions, shipped with the code (imagenet_classes.tsv: WordNet ID and
its lemmas per class, in label order, as TFDS and timm number them), so that predictions name
classes ('tench, Tinca tinca', not 'n01440764') for converted timm models and ImageNet runs.
"""

import functools
import pathlib

TABLE = pathlib.Path(__file__).with_name('imagenet_classes.tsv')


@functools.cache
def descriptions() -> dict[str, str]:
  """WordNet ID -> lemmas, in label order."""
  return dict(line.split('\t') for line in TABLE.read_text().splitlines())


def readable(names: list[str] | None) -> list[str] | None:
  """`names` with ImageNet's WordNet IDs replaced by their lemmas (TFDS names ImageNet-1k's
  classes, and an ImageNet-style image folder's are named, by their IDs)."""
  return None if names is None else [descriptions().get(n, n) for n in names]
