"""Running a PyTorch reference script (tests/scripts/) in its own process: torch cannot share a
process with TensorFlow. torch and timm come from requirements-timm.txt, which CI installs."""

import importlib.util
import os
import subprocess
import sys

import pytest

from tests import load

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'scripts')


def run_script(name: str, out_dir: str, *args: str, timeout: int = 900) -> None:
  """tests/scripts/NAME OUT_DIR ARGS...; skips without torch/timm, but fails so in CI."""
  missing = [m for m in ('torch', 'timm', 'safetensors') if importlib.util.find_spec(m) is None]
  if missing:
    how = 'pip install -r requirements-timm.txt'
    if os.environ.get('CI') == 'true':
      pytest.fail(f'{missing} missing in CI: {how}')
    pytest.skip(f'needs {missing}: {how}')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  subprocess.run(
    [sys.executable, os.path.join(SCRIPTS, name), str(out_dir), *args],
    check=True,
    timeout=load.timeout(timeout),
    env=env,
  )
