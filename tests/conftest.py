"""Eight fake CPU devices for sharding tests; must run before jax is imported.

XLA:CPU also expands optimization barriers and CSEs rematerialised blocks away; keeping them, as
the TPU and GPU compilers do, makes the CPU buffer plan show what remat saves on an accelerator.
"""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
                           ' --xla_disable_hlo_passes=cse_barrier_expander').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
