"""Timeouts that scale with how loaded this machine is: where load decides whether a test
finishes in time (a subprocess's bound), the bound is its idle time here times the slowdown of a
fixed piece of work measured once per test session (conftest.py), never less than the idle
bound. A loaded CI machine then gets more time instead of a timeout that names nothing."""

import os
import time

# The fixed work's seconds on this project's 2-core machine, idle.
IDLE_WORK_S = 0.07


def measure_slowdown() -> float:
  """The fixed work's time now (the median of three) over its idle time, at least 1."""
  times = []
  for _ in range(3):
    start = time.perf_counter()
    total = 0
    for i in range(1_500_000):
      total += i * i % 7
    times.append(time.perf_counter() - start)
  return max(1.0, sorted(times)[1] / IDLE_WORK_S)


def timeout(idle_seconds: float) -> float:
  """`idle_seconds` scaled by the session's measured slowdown."""
  return idle_seconds * float(os.environ.get('HALONET_TESTS_SLOWDOWN', '1'))
