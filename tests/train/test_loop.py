"""What is due after a step (halonet/train/loop.py's `due`), as a table worked out by hand: saves
every checkpoint_every steps, at the last step and on preemption; evaluations every eval_every
steps before the last (the final one follows the loop), none on preemption. The metrics of the
steps: each window their means, each check the first non-finite step named."""

import pytest

from halonet.train import loop

# step, num_steps, checkpoint_every, eval_every, preempted -> save, evaluate, stop
TABLE = [
  (1, 10, 2, 5, False, False, False, False),
  (2, 10, 2, 5, False, True, False, False),
  (5, 10, 2, 5, False, False, True, False),
  (4, 10, 4, 4, False, True, True, False),  # Both at once.
  (10, 10, 4, 5, False, True, False, False),  # The last: saved; its evaluation follows the loop.
  (10, 10, 3, 7, False, True, False, False),  # The last is saved off the save spacing too.
  (3, 10, 2, 3, True, True, False, True),  # Preempted: saved off spacing, not evaluated.
  (6, 10, 2, 3, True, True, False, True),  # Preempted at an evaluation step: still none.
  (7, 10, 100, 100, False, False, False, False),
  (1, 1, 100, 1, False, True, False, False),  # One step: it is the last.
  (0, 10, 1, 1, False, True, True, False),  # Step 0 is a multiple of every spacing.
]


@pytest.mark.parametrize(
  'step, num, every_save, every_eval, preempted, save, evaluate, stop', TABLE
)
def test_due_after_a_step(step, num, every_save, every_eval, preempted, save, evaluate, stop):
  due = loop.due(step, num, checkpoint_every=every_save, eval_every=every_eval, preempted=preempted)
  assert (due.save, due.evaluate, due.stop) == (save, evaluate, stop)
  assert due.check == (save or evaluate)  # Nothing unchecked is saved or evaluated.


def _metrics(loss, lr=0.1, finite=True):
  return {'loss': loss, 'top1': 10 * loss, 'grad_norm': loss + 1, 'lr': lr, 'state_finite': finite}


def test_each_window_averages_the_steps_since_the_previous_one():
  """The logged means are over the steps since the last window, each step once (worked out by
  hand); the learning rate is the window's last step's."""
  metrics = loop.TrainMetrics(lambda: 'no checkpoint was saved')
  for step, loss in enumerate([1.0, 3.0], start=1):
    metrics.add(step, _metrics(loss, lr=0.1 * step))
  metrics.check()  # A fetch before the window (a save's) counts each step once all the same.
  assert metrics.window() == {'loss': 2.0, 'top1': 20.0, 'grad_norm': 3.0, 'lr': 0.2}
  for step, loss in enumerate([5.0, 6.0, 10.0], start=3):
    metrics.add(step, _metrics(loss, lr=0.1 * step))
  assert metrics.window() == {'loss': 7.0, 'top1': 70.0, 'grad_norm': 8.0, 'lr': 0.5}


def test_a_check_names_the_first_step_that_is_not_finite():
  metrics = loop.TrainMetrics(lambda: 'last good checkpoint is step 2')
  metrics.add(3, _metrics(1.0))
  metrics.add(4, _metrics(1.0, finite=False))
  metrics.add(5, _metrics(float('nan')))
  with pytest.raises(FloatingPointError) as raised:
    metrics.check()
  assert str(raised.value) == (
    'the updated parameters or optimizer state are not finite at step 4; stopped without saving '
    'it, last good checkpoint is step 2'
  )
