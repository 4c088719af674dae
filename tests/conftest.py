"""Eight fake CPU devices for sharding tests; must run before jax is imported.

XLA:CPU also expands optimization barriers and CSEs rematerialised blocks away; keeping them, as
the TPU and GPU compilers do, makes the CPU buffer plan show what remat saves on an accelerator.
Many tests (and the train.py subprocesses they start, which inherit the environment) compile the
same tiny steps: a session-wide JAX compilation cache compiles each once, then loads it.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
                           ' --xla_disable_hlo_passes=cse_barrier_expander').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_CACHE = tempfile.mkdtemp(prefix='halonet_tests_jax_cache_')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
