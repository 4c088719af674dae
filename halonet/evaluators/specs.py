"""config.evals: the evaluations a run makes beside its own eval splits, one string each.

  DATASET[:SPLIT][@EVERY]               a labelled dataset, scored as what it is:
    imagenet2012_real                   ReaL accuracy on its label sets (split validation)
    imagenet_a, imagenet_r              top-1 among the set's 200 classes (split test)
    imagenet2012_corrupted              mCE over 15 corruptions x 5 severities (validation)
    anything else                       top-1/top-5 (imagenet_v2/matched-frequency,
                                        imagenet_v2/threshold-0.7, imagenet_v2/topimages and
                                        imagenet_sketch: split test)
  fewshot:DATASET[:TRAIN:TEST][@EVERY]  ridge probes on frozen pre-logits features, fit on
                                        config.fewshot_shots examples per class of TRAIN
                                        (default train) and scored on TEST (default test)

DATASET is a TFDS name (read from config.input.data_dir), 'digits' or 'digits/A-B', or the path
of an image folder (<split>/<class>/<image>; '/', '~', '.' or a URL). Without @EVERY an evaluator
runs at the end of training and from eval.py; with it, also every EVERY training steps.
"""

import dataclasses
import re

from halonet import errors
from halonet import paths

TOP1, REAL, SUBSET, MCE, FEWSHOT = 'top1', 'real', 'subset200', 'mce', 'fewshot'
# How each named dataset is scored and the split it is scored on; others: top-1 on 'test'.
KNOWN = {
  'imagenet2012_real': (REAL, 'validation'),
  'imagenet_a': (SUBSET, 'test'),
  'imagenet_r': (SUBSET, 'test'),
  'imagenet2012_corrupted': (MCE, 'validation'),
  'imagenet_sketch': (TOP1, 'test'),
  'imagenet_v2': (TOP1, 'test'),
}
_SPEC = re.compile(r'(?P<body>[^@]+?)(?:@(?P<every>\d+))?')


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One entry of config.evals, parsed."""

  spec: str  # As written: the name its records and table rows carry.
  metric: str  # TOP1, REAL, SUBSET, MCE or FEWSHOT.
  dataset: str  # A TFDS or digits name, or 'image_folder' (its root in `folder`).
  splits: tuple[str, ...]  # The split scored; a probe's (train, test).
  every: int  # Also every `every` training steps; 0: at the end and from eval.py only.
  folder: str = ''

  def due(self, step: int, num_steps: int) -> bool:
    """Whether it runs after training step `step` of `num_steps` (the last step: always)."""
    return step == num_steps or (self.every > 0 and step % self.every == 0)


def _is_path(dataset: str) -> bool:
  return dataset.startswith(('/', '~', '.')) or paths.is_url(dataset)


def parse(spec: str) -> Evaluator:
  """`spec` parsed; a malformed one is a ConfigError naming it."""
  match = _SPEC.fullmatch(spec.strip())
  parts = re.split(r':(?!//)', match['body']) if match else []  # gs://... is one part.
  probe = bool(parts) and parts[0] == FEWSHOT
  if probe:
    parts = parts[1:]
  wanted = (1, 3) if probe else (1, 2)
  if not parts or len(parts) not in wanted or not all(parts) or (match['every'] or '1') == '0':
    form = 'fewshot:DATASET[:TRAIN:TEST]' if probe else 'DATASET[:SPLIT]'
    raise errors.ConfigError(
      f'config.evals entry {spec!r} is not {form}[@EVERY] (EVERY > 0 training steps)'
    )
  dataset, *splits = parts
  every = int(match['every'] or 0)
  folder = paths.as_string(dataset) if _is_path(dataset) else ''
  if folder:
    dataset = 'image_folder'
  if probe:
    return Evaluator(spec, FEWSHOT, dataset, tuple(splits) or ('train', 'test'), every, folder)
  metric, split = KNOWN.get(dataset.split('/')[0], (TOP1, 'test'))
  if metric == MCE and '/' in dataset:  # One corruption at one severity: its top-1.
    metric = TOP1
  return Evaluator(spec, metric, dataset, tuple(splits) or (split,), every, folder)


def parse_all(specs: tuple[str, ...] | list[str]) -> list[Evaluator]:
  """config.evals parsed, in order; an entry given twice is refused (its records would mix)."""
  evaluators = [parse(s) for s in specs]
  seen = set()
  for e in evaluators:
    if e.spec.split('@')[0] in seen:
      raise errors.ConfigError(f'config.evals names {e.spec.split("@")[0]!r} twice')
    seen.add(e.spec.split('@')[0])
  return evaluators
