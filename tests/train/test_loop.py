"""What is due after a step (halonet/train/loop.py's `due`), as a table worked out by hand: saves
every checkpoint_every steps, at the last step and on preemption; evaluations every eval_every
steps before the last (the final one follows the loop), none on preemption."""

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
