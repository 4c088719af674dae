"""Training loop: one jitted step over a ('data', 'spatial') mesh, periodic exact evaluation,
async Orbax checkpoints, and a clean stop on preemption or a non-finite loss. The run it drives is
set up by setup.py; what is due after a step is `due`'s to say."""

from collections.abc import Callable
import dataclasses
import signal
import threading
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from halonet import console
from halonet import paths
from halonet import storage
from halonet.train import checkpointing
from halonet.train import evaluation as eval_lib
from halonet.train import event_writer
from halonet.train import progress
from halonet.train import setup
from halonet.train import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Due:
  """What a step calls for once it has run."""

  save: bool
  evaluate: bool
  stop: bool  # Preempted: saved, then stopped without evaluating.

  @property
  def check(self) -> bool:
    """Fetch the pending metrics and check them finite: nothing unchecked is saved or evaluated."""
    return self.save or self.evaluate


def due(
  step: int, num_steps: int, *, checkpoint_every: int, eval_every: int, preempted: bool
) -> Due:
  """After `step` of `num_steps`: a save every `checkpoint_every` steps, at the last step and on
  preemption; an evaluation every `eval_every` steps before the last (the final one follows the
  loop) unless preempted."""
  save = step % checkpoint_every == 0 or step == num_steps or preempted
  evaluate = step % eval_every == 0 and step < num_steps and not preempted
  return Due(save=save, evaluate=evaluate, stop=preempted)


class TrainMetrics:
  """The steps' device metrics, fetched only when needed (every step would stall dispatch). Each
  fetch checks that the loss and the updated state are finite, and every save waits for it, so
  every saved step is known finite."""

  def __init__(
    self, last_good: Callable[[], str], names: tuple[str, ...] = ('loss', 'top1', 'grad_norm')
  ):
    self._last_good = last_good
    self._names = names  # Averaged over each window.
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._fetched: list[dict[str, np.ndarray]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self._pending.append((step, metrics))

  def check(self) -> None:
    """Fetches the pending steps' metrics; raises at the first non-finite one."""
    fetched = jax.device_get([m for _, m in self._pending])
    for (step, _), m in zip(self._pending, fetched):
      if not (np.isfinite(m['loss']) and m['state_finite']):
        what = (
          f'loss is {m["loss"]}'
          if not np.isfinite(m['loss'])
          else 'the updated parameters or optimizer state are not finite'
        )
        raise FloatingPointError(
          f'{what} at step {step}; stopped without saving it, {self._last_good()}'
        )
    self._fetched += fetched
    self._pending.clear()

  def window(self) -> dict[str, float]:
    """Means over the steps since the previous window (the last step's learning rate)."""
    self.check()
    fetched, self._fetched = self._fetched, []
    means = {k: float(np.mean([m[k] for m in fetched])) for k in self._names}
    return {**means, 'lr': float(fetched[-1]['lr'])}


class Preemption:
  """SIGTERM sets a flag the loop checks each step; multi-host runs use Orbax's sync point."""

  def __init__(self):
    self.event = threading.Event()
    self.previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())

  def reached(self, manager, step: int) -> bool:
    return self.event.is_set() or manager.reached_preemption(step)

  def close(self):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, Any]:
  """Trains (resuming from workdir/checkpoints if present) and returns the last results."""
  run = setup.set_up(config, workdir, allow_config_change=allow_config_change)
  if run is None:  # The same command on a finished run: nothing to do, nothing rewritten.
    return workdir_lib.read_results(workdir)
  return train(run)


def train(run: setup.Run) -> dict[str, Any]:
  """Runs `run` from its start step to its last, evaluating and saving as `due` says; returns
  its results (also written to results.json)."""
  config, workdir, manager, state = run.config, run.workdir, run.manager, run.state
  writer = event_writer.create(workdir, just_logging=jax.process_index() > 0)
  preemption = Preemption()

  def last_good() -> str:
    latest = manager.latest_step()
    return (
      'no checkpoint was saved'
      if latest is None
      else f'last good checkpoint is step {latest} (all parameters finite)'
    )

  metrics_of_steps = TrainMetrics(last_good)
  report = progress.ProgressReport(
    num_steps=run.num_steps,
    batch_size=config.batch_size,
    every_steps=config.log_every_steps,
    writer=writer,
    window=metrics_of_steps.window,
  )
  profile = progress.StepProfile(config.profile_steps, workdir) if config.profile_steps else None
  # Called before the first step with its number, and after each with its number and metrics.
  actions: list[Callable[..., Any]] = [report, profile] if profile else [report]
  results = {
    'step': run.start_step,
    'num_params': run.num_params,
    'compile_seconds': run.compile_seconds,
    'train_images_per_sec': run.previous.get('train_images_per_sec'),
  }

  def evaluate(step: int) -> None:
    with report.apart('eval'):
      evals = eval_lib.evaluate_all(run.eval_fn, state, config, run.sizes, run.mesh)
    results.update(step=step, **{f'{name}_eval': v for name, v in evals.items()})
    writer.write_scalars(step, eval_lib.split_scalars(evals))
    for name, splits in evals.items():
      if step < run.num_steps:  # The final results get their own lines below.
        console.say(
          f'eval step {step} ({name} params): '
          + ', '.join(
            f'{split} top-1 {r["top1"]:.2f}% top-5 {r["top5"]:.2f}%' for split, r in splits.items()
          )
        )
    results['train_images_per_sec'] = report.images_per_sec or results['train_images_per_sec']
    workdir_lib.write_results(workdir, results)
    if paths.is_url(workdir):
      writer.flush()

  def evaluate_others(step: int) -> None:
    """The evaluators of config.evals due at `step`."""
    due_now = [e for e in run.evaluators if e.due(step, run.num_steps)]
    if not due_now:
      return
    metrics_of_steps.check()
    with report.apart('eval'):
      evals = eval_lib.run_evaluators(due_now, run.infer_of, state, config, workdir, writer)
    results.setdefault('evals', {}).update(evals)
    workdir_lib.write_results(workdir, results)
    if paths.is_url(workdir):
      writer.flush()

  step = run.start_step
  for action in actions:
    action(step)
  try:
    with jax.set_mesh(run.mesh), checkpointing.naming_last_commit(manager):
      while step < run.num_steps:
        state, metrics = run.step_fn(state, next(run.batches))
        step += 1
        metrics_of_steps.add(step, metrics)
        for action in actions:
          action(step, metrics)
        now = due(
          step,
          run.num_steps,
          checkpoint_every=config.checkpoint_every_steps,
          eval_every=config.eval_every_steps,
          preempted=preemption.reached(manager, step),
        )
        if now.check:
          metrics_of_steps.check()
        if now.save:
          with report.apart('checkpoint'):
            checkpointing.save(manager, step, state)
            if paths.is_url(workdir):  # A bucket gets whole events files: the metrics up to a
              writer.flush()  # checkpoint then outlive a kill, as the state does.
        if now.stop:
          logging.warning('preempted at step %d: checkpoint saved, stopping', step)
          return {**results, 'step': step, 'preempted': True}
        if now.evaluate:
          evaluate(step)
        if step < run.num_steps:
          evaluate_others(step)
      evaluate(step)
      evaluate_others(step)
      checkpointing.wait_saved(manager, step, state)
    for name in ('raw', 'ema'):
      for split, r in results.get(f'{name}_eval', {}).items():
        console.say(
          f'final {split} accuracy ({name} params, step {step}): '
          f'top-1 {r["top1"]:.2f}% top-5 {r["top5"]:.2f}%'
        )
    return results
  finally:
    if profile:
      profile.close()
    preemption.close()
    if not storage.outage_declared():  # Else each would wait on the store again, in vain.
      writer.close()
      try:
        checkpointing.finish(manager)
      finally:
        if run.lease is not None:
          run.lease.release()
