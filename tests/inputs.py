"""The input pipeline as the training system calls it, from a whole run config: what the tests
of the pipeline, evaluation and resume read batches with."""

from collections.abc import Iterator
from typing import Any

import ml_collections

from halonet.data import pipeline as input_pipeline


def create_split(
  config: ml_collections.ConfigDict, split: str, **kwargs: Any
) -> Iterator[input_pipeline.Batch]:
  """input_pipeline.create_split of config.input, with the run's image size, classes and seed;
  one process reading the whole split unless `kwargs` say otherwise."""
  shard = {'split_size': None, 'process_index': 0, 'process_count': 1}
  return input_pipeline.create_split(
    config.input,
    split,
    image_size=config.image_size,
    num_classes=config.num_classes,
    seed=config.seed,
    **{**shard, **kwargs},
  )
