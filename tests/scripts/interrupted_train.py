"""train.py, but the train iterator (classification's or detection's) sends `signal` to its own
process just before it reads batch `at_step` (once `wait_for`, a finished checkpoint dir,
exists; '-': at once): a kill at an exact point of the run, which an outside timer could not hit
in a run this short. Batches are numbered from `resumed_at`, the step the test knows the run
resumes from, not from what the code under test asks the pipeline for: an off-by-one there then
fails the final comparison.

Usage: interrupted_train.py SIGNAL AT_STEP WAIT_FOR RESUMED_AT TRAIN_FLAGS...
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# pylint: disable=wrong-import-position
from absl import app

from halonet.data import pipeline as input_pipeline
from halonet.detection import data as detection_data
import train

sig, at_step, wait_for = getattr(signal, sys.argv[1]), int(sys.argv[2]), sys.argv[3]
resumed_at = int(sys.argv[4])
create_split = input_pipeline.create_split
detection_batches = detection_data.train_batches


def _interrupting(batches):
  for step, batch in enumerate(batches, resumed_at + 1):
    if step == at_step:
      deadline = time.time() + 120
      while wait_for != '-' and not os.path.isdir(wait_for) and time.time() < deadline:
        time.sleep(0.05)
      os.kill(os.getpid(), sig)
    yield batch


def interrupting(config, split, *, train, **kwargs):
  batches = create_split(config, split, train=train, **kwargs)
  return _interrupting(batches) if train else batches


input_pipeline.create_split = interrupting
detection_data.train_batches = lambda *args, **kwargs: _interrupting(
  detection_batches(*args, **kwargs)
)
app.run(train.main, argv=['train.py'] + sys.argv[5:])
