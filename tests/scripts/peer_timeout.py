"""Process PROCESS_ID of 2 on 127.0.0.1:PORT: process 0 publishes its first value and never the
second (as a process that stalls); process 1 asks for both, with a bound of 3 s on the second.
Prints what process 1 got, then the one line its second wait ended with."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# pylint: disable=wrong-import-position
import jax  # noqa: E402

from halonet import errors  # noqa: E402
from halonet import sharding  # noqa: E402

port, process_id = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
first = sharding.broadcast_json({'from': jax.process_index()}, 'a value')
if process_id == 0:
  sharding.broadcast_json({'again': True}, 'a value', timeout_s=3)  # Published too late...
  print('published', flush=True)
else:
  print('got', first, flush=True)
  try:
    sharding.broadcast_json(None, 'the second value', timeout_s=3)
  except errors.PeerTimeout as e:
    print(e, flush=True)
