"""config.evals in a training run and from eval.py's entry point: due when each says, recorded as
each finishes, and a linear probe on digits a run never saw beating chance."""

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from configs import tiny
from halonet import paths
from halonet.evaluators import run as evaluators_lib
from halonet.train import evaluation as eval_lib
from halonet.train import loop as train_lib

PROBE = 'fewshot:digits/5-9'  # Five digits the run below never trains on: chance is 20%.


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  """A run trained on the digits 0-4 that evaluates its test split every 75 steps through the
  evaluators, and probes the digits 5-9 at its end."""
  config = tiny.get_config()
  config.input.dataset = 'digits/0-4'
  config.num_classes = 5
  config.num_train_steps = 150
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 0.064  # 4e-3 at batch 16.
  config.checkpoint_every_steps = 150
  config.eval_every_steps = 150
  config.log_every_steps = 50
  config.evals = ('digits/0-4:test@75', PROBE)
  config.fewshot_shots = (1, 10)
  config.fewshot_seeds = 5
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  return config, workdir, train_lib.train_and_evaluate(config, workdir)


def test_a_probe_on_digits_the_run_never_saw_beats_chance_by_20_points(digits_run):
  _, _, results = digits_run
  probe = results['evals'][PROBE]['raw']
  assert probe['10shot'] >= 40.0, probe  # Chance: 20%.
  assert probe['1shot'] > 20.0 and probe['10shot_std'] < 10.0, probe
  assert probe['count'] == 180  # The test images of the digits 5-9.


def test_evaluators_run_when_due_and_agree_with_the_runs_own_evaluation(digits_run):
  _, workdir, results = digits_run
  # The same split through the evaluators (logits in NumPy) and the eval step (sums on device).
  own = results['raw_eval']['test']
  through_evaluators = results['evals']['digits/0-4:test@75']['raw']
  assert through_evaluators['count'] == own['count'] == 180
  assert through_evaluators['top1'] == pytest.approx(own['top1'])
  assert through_evaluators['top5'] == pytest.approx(own['top5'])
  records = paths.read_json_lines(f'{workdir}/eval_records.jsonl')
  assert [(r['step'], r['evaluator'], r['metric']) for r in records] == [
    (75, 'digits/0-4:test@75', 'top1'),
    (150, 'digits/0-4:test@75', 'top1'),
    (150, PROBE, 'fewshot'),
  ]
  assert records[-1]['split'] == 'train:test' and records[-1]['weights'] == 'raw'
  events = event_accumulator.EventAccumulator(workdir)
  events.Reload()
  scalar = lambda tag: {
    e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)
  }
  assert scalar('evals/raw/digits/0-4:test@75/top1') == {
    r['step']: pytest.approx(r['top1']) for r in records[:2]
  }
  assert scalar(f'evals/raw/{PROBE}/10shot') == {150: pytest.approx(records[-1]['10shot'])}


def test_from_eval_py_a_failing_evaluator_loses_nothing_recorded_before_it(digits_run, monkeypatch):
  config, workdir, _ = digits_run
  records_path = f'{workdir}/eval_records.jsonl'
  before = paths.read_text(records_path)

  # A missing folder is named before anything is restored or written.
  config.evals = ('fewshot:/nonexistent/folder',)
  with pytest.raises(FileNotFoundError, match="no directory '/nonexistent/folder/train'"):
    eval_lib.evaluate_checkpoint(config, workdir)
  assert paths.read_text(records_path) == before

  evaluate = evaluators_lib.evaluate

  def fails_on_the_probe(config, evaluator, infer):
    if evaluator.spec == PROBE:
      raise RuntimeError('the probe broke')
    return evaluate(config, evaluator, infer)

  monkeypatch.setattr(evaluators_lib, 'evaluate', fails_on_the_probe)
  config.evals = ('digits/0-4:test', PROBE)
  with pytest.raises(RuntimeError, match='the probe broke'):
    eval_lib.evaluate_checkpoint(config, workdir)
  # The evaluation's TensorBoard run 'eval' holds what finished before the failure.
  events = event_accumulator.EventAccumulator(f'{workdir}/eval')
  events.Reload()
  assert {'eval/raw/test/top1', 'evals/raw/digits/0-4:test/top1'} <= set(events.Tags()['tensors'])
  after = paths.read_text(records_path)
  assert after.startswith(before)
  added = paths.read_json_lines(records_path)[3:]
  assert [(r['step'], r.get('evaluator'), r['split']) for r in added] == [
    (150, None, 'test'),  # The run's own split, then the evaluators in order.
    (150, 'digits/0-4:test', 'test'),
  ]
