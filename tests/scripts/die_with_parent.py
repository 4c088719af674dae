"""Runs a command that dies with the process that started it: python die_with_parent.py PARENT_PID
COMMAND [ARGS...] asks Linux to send it SIGKILL when its parent ends (prctl's parent-death
signal), then becomes COMMAND (exec: same pid, same files). conftest.py starts every child of
the tests through it, so a test runner killed by SIGKILL leaves no server or training behind.
Imports nothing outside the standard library (it runs with -S)."""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1

parent, command = int(sys.argv[1]), sys.argv[2:]
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
if os.getppid() != parent:  # The parent ended before the request took hold.
  sys.exit(1)
os.execvp(command[0], command)
