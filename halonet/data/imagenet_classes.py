"""ImageNet-1k's class descriptions, shipped with the code (imagenet_classes.tsv: WordNet ID and
its lemmas per class, in label order, as TFDS and timm number them), so that predictions name
classes ('tench, Tinca tinca', not 'n01440764') for converted timm models and ImageNet runs.
"""

import functools
import pathlib

TABLE = pathlib.Path(__file__).with_name('imagenet_classes.tsv')
# The 200 classes each of ImageNet-A and ImageNet-R has (Hendrycks et al.), by WordNet ID.
SUBSETS = {
  'imagenet_a': pathlib.Path(__file__).with_name('imagenet_a_wnids.txt'),
  'imagenet_r': pathlib.Path(__file__).with_name('imagenet_r_wnids.txt'),
}


@functools.cache
def descriptions() -> dict[str, str]:
  """WordNet ID -> lemmas, in label order."""
  return dict(line.split('\t') for line in TABLE.read_text().splitlines())


@functools.cache
def subset_indices(name: str) -> tuple[int, ...]:
  """The 1,000-way label indices of a 200-class ImageNet test set ('imagenet_a', 'imagenet_r'),
  ascending: those sets are scored on these logits only, as their authors do."""
  order = {wnid: i for i, wnid in enumerate(descriptions())}
  return tuple(sorted(order[w] for w in SUBSETS[name].read_text().split()))


def readable(names: list[str] | None) -> list[str] | None:
  """`names` with ImageNet's WordNet IDs replaced by their lemmas (TFDS names ImageNet-1k's
  classes, and an ImageNet-style image folder's are named, by their IDs)."""
  return None if names is None else [descriptions().get(n, n) for n in names]
