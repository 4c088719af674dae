"""Where examples come from and what happens to their pixels: TFDS and image folders, the
offline digits, preprocessing, RandAugment and the stream of batches."""
